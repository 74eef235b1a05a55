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
from kdq.quant.tree import states_by_path

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


def sown_statistics(
    model: nn.Module, variables: Any, batches: list, recipe: QuantRecipe, record, apply_kwargs
) -> list[dict[str, Any]]:
    """Per batch, {"<module path>/lo" | "/hi": values} that `record(x, spec)` returns.

    Each selected module input x of each batch goes through `record` (see
    `activation_interceptor`); the sown values are tuples, one entry per call
    of the module in the batch.
    """

    @jax.jit
    def stats_of(variables, x):
        with nn.intercept_methods(activation_interceptor(recipe, record=record)):
            _, state = model.apply(variables, x, mutable=[STATS_COLLECTION], **apply_kwargs)
        return state[STATS_COLLECTION]

    return [
        flax.traverse_util.flatten_dict(jax.device_get(stats_of(variables, x)), sep="/")
        for x in batches
    ]


def _check_ema_decay(ema_decay: Any) -> None:
    if (
        isinstance(ema_decay, bool | np.bool_)
        or not isinstance(ema_decay, int | float | np.integer | np.floating)
        or not 0.0 <= ema_decay < 1.0
    ):
        raise ValueError(f"ema_decay must be in [0, 1), got ema_decay={ema_decay!r}")


def _aggregate(lo: np.ndarray, hi: np.ndarray, name: str, ema_decay: float):
    """(lo, hi) over the batches' ranges by the method `name` (see the module docstring)."""
    if name == "minmax":
        return lo.min(), hi.max()
    if name == "percentile":
        return lo.mean(), hi.mean()
    lo_agg, hi_agg = lo[0], hi[0]
    for lo_b, hi_b in zip(lo[1:], hi[1:], strict=True):
        lo_agg = ema_decay * lo_agg + (1 - ema_decay) * lo_b
        hi_agg = ema_decay * hi_agg + (1 - ema_decay) * hi_b
    return lo_agg, hi_agg


def _batch_ranges(per_batch: list[dict[str, Any]], path: str) -> tuple[np.ndarray, np.ndarray]:
    """(lo_b, hi_b) of module `path`'s input on each batch; ValueError if one is not finite."""
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
    return lo, hi


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
    _check_ema_decay(ema_decay)
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_activations needs at least one batch, got none")
    specs = activation_report(model, variables, batches[0], rules=recipe.act_rules, **apply_kwargs)

    def record(x, spec):
        return batch_range(x, spec, percentile)

    per_batch = sown_statistics(model, variables, batches, recipe, record, apply_kwargs)
    flat = {}
    for path, spec in specs.items():
        if spec is None:
            continue
        lo, hi = _batch_ranges(per_batch, path)
        scale, zero_point = scale_from_range(*_aggregate(lo, hi, name, ema_decay), spec)
        flat[f"{path}/scale"] = scale
        if zero_point is not None:
            flat[f"{path}/zero_point"] = zero_point
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def mean_abs_inputs(
    model: nn.Module, variables: Any, batches: list, recipe: QuantRecipe, **apply_kwargs: Any
) -> dict[str, float]:
    """{module path: mean over batches of <|x|>} for every selected module input x."""

    def record(x, spec):
        mean = jnp.mean(jnp.abs(x.astype(jnp.float32)))
        return mean, mean

    per_batch = sown_statistics(model, variables, batches, recipe, record, apply_kwargs)
    paths = {key.rsplit("/", 1)[0] for key in per_batch[0]}
    return {path: float(np.mean([np.mean(b[f"{path}/hi"]) for b in per_batch])) for path in paths}


class BatchCalibration:
    """Calibration batches' measurements of each selected module input (`Calibration`).

    `range(path)` comes from `calibrate_activations` (measured on
    construction), `mean_abs(path)` from `mean_abs_inputs` (on first use).
    """

    def __init__(self, model, variables, batches, recipe, *, method, **apply_kwargs):
        batches = list(batches)
        self._measure = (model, variables, batches, recipe, apply_kwargs)
        ranges = calibrate_activations(
            model, variables, batches, recipe, method=method, **apply_kwargs
        )
        self.ranges = states_by_path(ranges)
        self._means: dict[str, float] | None = None

    def range(self, path: str) -> dict[str, Any]:
        return self.ranges[path]

    def mean_abs(self, path: str) -> float:
        if self._means is None:
            model, variables, batches, recipe, apply_kwargs = self._measure
            self._means = mean_abs_inputs(model, variables, batches, recipe, **apply_kwargs)
        return self._means[path]
