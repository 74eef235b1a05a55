"""Activation ranges from calibration batches (post-training quantization).

For every module input an activation rule selects, a per-batch range
[lo_b, hi_b] is measured, then aggregated over the N batches:

  "minmax":          lo = min_b lo_b,   hi = max_b hi_b         (lo_b, hi_b: batch min / max)
  "ema":             m_1 = r_1,  m_b = d * m_{b-1} + (1 - d) * r_b   for r = lo, hi (decay d)
  "percentile,<p>":  lo = mean_b P_{min(p, 100-p)}(x_b),  hi = mean_b P_{max(p, 100-p)}(x_b)

(P_q is numpy's default linear-interpolation percentile, so for an affine
spec "percentile,1" and "percentile,99" give the same range, as in
`kdq.quant.calibrate`.)
For a symmetric spec the statistic is taken of |x| (signed) or max(x, 0)
(unsigned), hi = P_p of it, and only hi matters. The range then gives the
static scale (and zero point) exactly as `kdq.quant.scale_from_range`.
Activations must be finite: a module whose range is NaN or infinite on some
batch raises `ValueError` naming the module and the batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdq.quant.intercept import STATS_COLLECTION, activation_interceptor, activation_report
from kdq.quant.numerics import scale_from_range
from kdq.quant.recipe import QuantRecipe
from kdq.quant.spec import QuantSpec, _parse_calibration

METHODS = ("minmax", "ema", "percentile,<p>")


def _parse_method(method: str) -> tuple[str, float | None]:
    if method == "ema":
        return method, None
    try:
        name, p = _parse_calibration(method)
    except ValueError:
        name, p = None, None
    if name not in ("minmax", "percentile"):
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}") from None
    return name, p


def batch_range(
    x: jax.Array, spec: QuantSpec, percentile: float | None
) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) of one batch of activations: min/max, or percentiles.

    Affine: (min x, max x), or the percentiles min(p, 100 - p) and
    max(p, 100 - p) of x. Symmetric: (-m, m) with m the max (or p-th
    percentile) of |x| (signed) or max(x, 0) (unsigned).
    """
    x = x.astype(jnp.float32)
    if spec.symmetric:
        magnitude = jnp.abs(x) if spec.signed else jnp.maximum(x, 0.0)
        hi = jnp.max(magnitude) if percentile is None else jnp.percentile(magnitude, percentile)
        return -hi, hi
    if percentile is None:
        return jnp.min(x), jnp.max(x)
    low, high = min(percentile, 100.0 - percentile), max(percentile, 100.0 - percentile)
    return jnp.percentile(x, low), jnp.percentile(x, high)


def calibrate_activations(
    model: nn.Module,
    variables: Any,
    batches: Iterable[jax.Array],
    recipe: QuantRecipe,
    *,
    method: str = "minmax",
    ema_decay: float = 0.9,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Static activation ranges of `recipe.act_rules` measured on `batches`.

    Args:
      model: any Linen model.
      variables: the variables the calibration forward pass uses (e.g. float
        params, or weights already fake-quantized).
      batches: model inputs, each (B, ...); at least one.
      recipe: gives the activation rules.
      method: "minmax", "ema" or "percentile,<p>" (see module docstring).
      ema_decay: d for "ema", in [0, 1).
      **apply_kwargs: passed to `model.apply` (e.g. train=False).

    Returns:
      act_state nested by module path: {path: {"scale"[, "zero_point"]}}.
    """
    name, percentile = _parse_method(method)
    if (
        isinstance(ema_decay, bool | np.bool_)
        or not isinstance(ema_decay, int | float | np.integer | np.floating)
        or not 0.0 <= ema_decay < 1.0
    ):
        raise ValueError(f"ema_decay must be in [0, 1), got ema_decay={ema_decay!r}")

    def record(x, spec):
        return batch_range(x, spec, percentile)

    @jax.jit
    def stats_of(variables, x):
        with nn.intercept_methods(activation_interceptor(recipe, record=record)):
            _, state = model.apply(variables, x, mutable=[STATS_COLLECTION], **apply_kwargs)
        return state[STATS_COLLECTION]

    per_batch = []
    for i, x in enumerate(batches):
        if i == 0:
            specs = activation_report(model, variables, x, rules=recipe.act_rules, **apply_kwargs)
        per_batch.append(
            flax.traverse_util.flatten_dict(jax.device_get(stats_of(variables, x)), sep="/")
        )
    if not per_batch:
        raise ValueError("calibrate_activations needs at least one batch, got none")

    flat = {}
    for path, spec in specs.items():
        if spec is None:
            continue
        # Sown values are tuples: one entry per call of the module in the batch.
        lo = np.array([np.min(b[f"{path}/lo"]) for b in per_batch], np.float32)
        hi = np.array([np.max(b[f"{path}/hi"]) for b in per_batch], np.float32)
        bad = np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi)))
        if bad.size:
            raise ValueError(
                f"the input of {path!r} has a non-finite range (NaN or inf) on calibration "
                f"batch(es) {bad.tolist()} of {len(per_batch)}: calibration needs finite "
                "activations; check those batches and the variables"
            )
        if name == "minmax":
            lo_agg, hi_agg = lo.min(), hi.max()
        elif name == "percentile":
            lo_agg, hi_agg = lo.mean(), hi.mean()
        else:
            lo_agg, hi_agg = lo[0], hi[0]
            for lo_b, hi_b in zip(lo[1:], hi[1:], strict=True):
                lo_agg = ema_decay * lo_agg + (1 - ema_decay) * lo_b
                hi_agg = ema_decay * hi_agg + (1 - ema_decay) * hi_b
        scale, zero_point = scale_from_range(lo_agg, hi_agg, spec)
        flat[f"{path}/scale"] = scale
        if zero_point is not None:
            flat[f"{path}/zero_point"] = zero_point
    return flax.traverse_util.unflatten_dict(flat, sep="/")
