"""Calibrated weights: the scale from the spec's calibration, at every call.

w_hat = fake_quant(w, spec): absmax, minmax, percentile or MSE clipping per
tensor, channel or group, the clipped straight-through gradient, optional
stochastic rounding. No state; the exported integer weight is
quantize(w, spec), with the same scale.
"""

from __future__ import annotations

from kdq.quant.numerics import fake_quant, quantize
from kdq.quant.quantizers.base import WeightQuantizer, register


class Calibrated(WeightQuantizer):
    """weight_mode "calibrated" (see the module docstring)."""

    name = "calibrated"

    def check_spec(self, rules_name, pattern, spec):
        """Any spec."""

    def init(self, w, spec, *, lsq_init):
        return None

    def apply(self, w, spec, state, *, key, path):
        return fake_quant(w, spec, key=key)

    def export(self, w, spec, state, path):
        return quantize(w, spec)

    def from_export(self, q):
        return None


CALIBRATED = register(Calibrated())
