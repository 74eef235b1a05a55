"""PACT: a learned clipping value per module input (Choi et al. 2018).

y = clip(x, qmin s, alpha), x_hat = round(y / s) * s with s = alpha / qmax
and the paper's gradients (`kdq.quant.pact_fake_quant`); the state is
{"log_alpha": log alpha} (see `kdq.quant.quantizers.base.learned_value`).
The exported integer model quantizes with scale s = alpha / qmax, computed
as QAT computes it; `alpha_state` is the inverse (alpha = s * qmax), and
`init` starts alpha at the calibrated scale times qmax.

Penalty: lambda * sum alpha^2 over every clip value, lambda =
`QuantRecipe.pact_alpha_decay` (Choi et al. 2018, section 2). Added to the
training loss it pulls alpha down at rate 2 lambda alpha, so a clip value
that no input reaches shrinks instead of staying where it started.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from kdq.quant.quantizers.base import (
    LearnedActQuantizer,
    learned_value,
    positive_scale,
    register,
)
from kdq.quant.spec import QuantSpec
from kdq.quant.ste import _pact_scale, pact_fake_quant

PACT_KEY = "log_alpha"


def learned_alpha(state: dict[str, jax.Array], path: str = "") -> jax.Array:
    """The PACT clip alpha = exp(clip(state["log_alpha"], -44, 44)) > 0 (see `learned_value`).

    Args:
      state: PACT state of one quantizer ({"log_alpha": u}).
      path: the quantizer's path, named in the error when the key is missing.

    Returns:
      The positive, finite clipping value alpha (the shape of u).
    """
    return learned_value(state, PACT_KEY, path)


def alpha_state(scale: Any, spec: QuantSpec) -> dict[str, jax.Array]:
    """{"log_alpha": log(s * qmax)}: the PACT state whose scale alpha / qmax is s."""
    return {PACT_KEY: jnp.log(positive_scale(scale) * spec.qmax)}


class Pact(LearnedActQuantizer):
    """act_mode "pact": learned clipping values (see the module docstring)."""

    name = "pact"
    state_key = PACT_KEY

    def init(self, spec, calibration, path, *, lsq_init):
        return alpha_state(calibration.range(path)["scale"], spec)

    def apply(self, x, spec, state, *, key, path):
        return pact_fake_quant(x, learned_alpha(state, path), spec)

    def export(self, state, spec, path):
        return {"scale": _pact_scale(learned_alpha(state, path), spec.qmax)}

    def from_export(self, exported, spec):
        return alpha_state(exported["scale"], spec)

    def penalties(self, act_state, recipe):
        """{"pact_alpha_decay": lambda * sum alpha^2} (none when lambda is 0)."""
        if not recipe.pact_alpha_decay:
            return {}
        flat = flax.traverse_util.flatten_dict(act_state or {}, sep="/")
        total = jnp.zeros((), jnp.float32)
        for key, value in flat.items():
            if key.rsplit("/", 1)[-1] == PACT_KEY:
                total = total + jnp.sum(jnp.square(learned_alpha({PACT_KEY: value})))
        return {"pact_alpha_decay": recipe.pact_alpha_decay * total}


PACT = register(Pact())
