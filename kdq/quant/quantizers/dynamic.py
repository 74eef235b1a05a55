"""Dynamic activations: the range of each batch, measured as it is quantized.

x_hat = fake_quant(x, spec): the scale (and zero point) is calibrated on x
itself by the spec's calibration at every call, per tensor or along
`spec.axes` (e.g. per token). No state, no calibration batches; the
integer path calibrates each input the same way.
"""

from __future__ import annotations

from kdq.quant.numerics import calibrate, fake_quant
from kdq.quant.quantizers.base import ActQuantizer, register


class Dynamic(ActQuantizer):
    """act_mode "dynamic": per-batch ranges (see the module docstring)."""

    name = "dynamic"
    needs_calibration = False

    def check_spec(self, rules_name, pattern, spec):
        """Any spec: per tensor, per row, stochastic rounding."""

    def apply(self, x, spec, state, *, key, path):
        return fake_quant(x, spec, key=key)

    def input_range(self, x, spec, exported):
        return calibrate(x, spec)


DYNAMIC = register(Dynamic())
