"""Static activations: fixed ranges measured on calibration batches.

State {"scale": s[, "zero_point": z]} per module input, the range of its
calibration batches (`kdq.quant.calibrate_activations`); it receives no
gradient. x_hat = fake_quant(x, spec, scale=s, zero_point=z) with the
clipped straight-through gradient; the integer model uses s and z as they are.
"""

from __future__ import annotations

from kdq.quant.numerics import fake_quant
from kdq.quant.quantizers.base import ActQuantizer, register, require_per_tensor

RANGE_KEYS = ("scale", "zero_point")


class Static(ActQuantizer):
    """act_mode "static": calibrated, fixed ranges (see the module docstring)."""

    name = "static"

    def check_spec(self, rules_name, pattern, spec):
        require_per_tensor(rules_name, pattern, spec, self.name)

    def init(self, spec, calibration, path, *, lsq_init):
        return calibration.range(path)

    def apply(self, x, spec, state, *, key, path):
        return fake_quant(
            x, spec, scale=state["scale"], zero_point=state.get("zero_point"), key=key
        )

    def export(self, state, spec, path):
        return {k: v for k, v in state.items() if k in RANGE_KEYS}

    def from_export(self, exported, spec):
        return dict(exported)


STATIC = register(Static())
