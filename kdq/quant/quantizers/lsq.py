"""LSQ: learned step size quantization (Esser et al. 2020), for weights and activations.

x_hat = round(clip(x / s, -Q_N, Q_P)) * s with the paper's gradients
(`kdq.quant.lsq_fake_quant`); the state is {"log_step": log s} (see
`kdq.quant.quantizers.base.learned_value`), one step per tensor for an
activation, per scale group of the spec for a weight. The exported integer
model quantizes with scale = s, and `step_state` is the inverse.

Initial steps (`init_quant_params(..., lsq_init=...)`):
  "calibration": s = the calibrated scale (weights: the spec's calibration,
    e.g. absmax per channel; activations: the range of the calibration
    batches), so QAT starts from the post-training-quantized model.
  "paper": s0 = 2 <|v|> / sqrt(Q_P), <|v|> the mean |value| of the weights
    sharing one step, or of a module's inputs over the calibration batches.

The gradient of an activation step is scaled by g = 1 / sqrt(N_F Q_P), N_F
the features of one example; a weight step's by 1 / sqrt(N_W Q_P), N_W the
weights sharing it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdq.quant.numerics import _reduce, calibrate, quantize, scale_shape
from kdq.quant.quantizers.base import (
    LearnedActQuantizer,
    WeightQuantizer,
    learned_value,
    positive_scale,
    register,
    require_symmetric,
)
from kdq.quant.spec import QuantSpec
from kdq.quant.ste import lsq_fake_quant, lsq_grad_scale

LSQ_KEY = "log_step"
LSQ_INITS = ("calibration", "paper")


def learned_step(state: dict[str, jax.Array], path: str = "") -> jax.Array:
    """The LSQ step s = exp(clip(state["log_step"], -44, 44)) > 0 (see `learned_value`).

    Args:
      state: LSQ state of one quantizer ({"log_step": u}).
      path: the quantizer's path, named in the error when the key is missing.

    Returns:
      The positive, finite step s (the shape of u).
    """
    return learned_value(state, LSQ_KEY, path)


def step_state(scale: Any) -> dict[str, jax.Array]:
    """{"log_step": log s}: the LSQ state whose step is the positive scale s."""
    return {LSQ_KEY: jnp.log(positive_scale(scale))}


def lsq_paper_step(x: Any, spec: QuantSpec) -> jax.Array:
    """LSQ's initial step s0 = 2 <|v|> / sqrt(Q_P) (Esser et al. 2020, section 2.1).

    <|v|> is the mean of |x| over the elements sharing one step (per tensor,
    per output channel for `spec.axes`, per group for `spec.group_size`),
    Q_P = spec.qmax. A group of zeros gets step 1 (any step represents 0).

    Args:
      x: the weights, or a batch of activations.
      spec: the quantizer (its axes choose the step's shape).

    Returns:
      float32 step of shape `kdq.quant.scale_shape(x.shape, spec)`.
    """
    x = jnp.abs(jnp.asarray(x, jnp.float32))
    mean = _reduce(x, scale_shape(x.shape, spec), jnp.mean)
    step = 2.0 * mean / np.sqrt(np.float32(spec.qmax))
    return jnp.where(step > 0, step, 1.0)


class LsqActivations(LearnedActQuantizer):
    """act_mode "lsq": a learned step per module input (see the module docstring)."""

    name = "lsq"
    state_key = LSQ_KEY

    def init(self, spec, calibration, path, *, lsq_init):
        scale = calibration.range(path)["scale"]
        if lsq_init == "paper":
            mean = np.full((1,), calibration.mean_abs(path), np.float32)
            scale = lsq_paper_step(mean, spec).reshape(())
        return step_state(scale)

    def apply(self, x, spec, state, *, key, path):
        features = max(x[0].size if x.ndim > 1 else x.size, 1)
        step = learned_step(state, path)
        return lsq_fake_quant(x, step, spec, grad_scale=lsq_grad_scale(features, spec))

    def export(self, state, spec, path):
        return {"scale": learned_step(state, path)}

    def from_export(self, exported, spec):
        return step_state(exported["scale"])


class LsqWeights(WeightQuantizer):
    """weight_mode "lsq": a learned step per scale group (see the module docstring)."""

    name = "lsq"
    learned = True

    def check_spec(self, rules_name, pattern, spec):
        require_symmetric(rules_name, pattern, spec, self.name)
        super().check_spec(rules_name, pattern, spec)

    def init(self, w, spec, *, lsq_init):
        step = lsq_paper_step(w, spec) if lsq_init == "paper" else calibrate(w, spec)[0]
        return step_state(step)

    def apply(self, w, spec, state, *, key, path):
        return lsq_fake_quant(w, learned_step(state, path), spec)

    def export(self, w, spec, state, path):
        return quantize(w, spec, scale=learned_step(state, path))

    def from_export(self, q):
        return step_state(q.scale)


LSQ_ACTIVATIONS = register(LsqActivations())
LSQ_WEIGHTS = register(LsqWeights())
