"""AWQ's activation-aware per-channel scale search (Lin et al. 2024).

AWQ ("AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration") quantizes the weight of a layer y = x @ W (W: K x N) after
scaling its salient input channels up, and the input down by the same factor:

    W_hat(s) = diag(1/s) Q(diag(s) W),   x @ W_hat(s) = (x / s) @ Q(diag(s) W),

with Q = dequantize . quantize the weight quantizer (`kdq.quant.quantize` with
the given spec, per channel or per group). A channel with a large scale keeps
more of its precision. The candidates are

    s(alpha) = a^alpha / sqrt(max(a^alpha) min(a^alpha)),
    alpha in {0, 1/grid, ..., (grid - 1)/grid},

with a_k = mean_r |x_rk| over the calibration rows (floored at 1e-4 max_k a_k so
that s stays finite; a = 0 everywhere gives s = 1), the normalisation keeping
the scales centred around 1. AWQ keeps the candidate with the smallest output
error on the calibration rows x_r, which is exactly a quadratic form in the
weight error:

    err(s) = sum_r ||x_r W_hat(s) - x_r W||^2 = tr(dW^T H dW),
    dW = W_hat(s) - W,   H = sum_r x_r^T x_r   (K x K),

so the search needs the input Gram matrix H, not the rows. Any positive
multiple of H picks the same s; the reported errors are in the units of the
given H (H = X^T X: the sum over rows; H = X^T X / n, as
`kdq.quant.input_statistics.InputStatistics.hessian` gives: the mean per row).
alpha = 0 (s = 1, plain round to nearest) is a candidate and ties go to the
smaller alpha, so on the calibration data AWQ is never worse than round to
nearest.

Deploying s: the kernel to quantize is diag(s) W and the layer's input is
divided by s (`kdq.quant.transforms`, key "smoothing").
"""

from __future__ import annotations

import dataclasses
import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdq.quant.numerics import dequantize, quantize, scale_shape
from kdq.quant.spec import QuantSpec

MEAN_ABS_FLOOR = 1e-4
CHUNK_ELEMENTS = 2**25


@dataclasses.dataclass(frozen=True)
class AWQResult:
    """The outcome of `awq_scales`.

    Attributes:
      scales: the chosen s, float32 (K,) (the values the search quantized with).
      alpha: the chosen exponent.
      error: err(s) = tr(dW^T H dW) of the chosen s, float64, in the units of H.
      rtn_error: err(1), the error of plain round to nearest (alpha = 0).
    """

    scales: np.ndarray
    alpha: float
    error: float
    rtn_error: float


def _finite(name: str, value: np.ndarray) -> None:
    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    if bad:
        raise ValueError(
            f"{name} must be finite, got {bad} NaN or inf value(s) of {value.size}; check the "
            "calibration statistics"
        )


def _check_inputs(weight, hessian, mean_abs, spec: QuantSpec, grid: object) -> None:
    if isinstance(grid, bool | np.bool_) or not isinstance(grid, numbers.Integral) or grid < 1:
        raise ValueError(f"grid must be an int >= 1 (the number of exponents), got grid={grid!r}")
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"weight must be a non-empty 2-D kernel (K, N), got shape {weight.shape}")
    k = weight.shape[0]
    if hessian.shape != (k, k) or mean_abs.shape != (k,):
        raise ValueError(
            f"AWQ needs weight (K, N), hessian (K, K) and act_mean_abs (K,) with the same K, got "
            f"{weight.shape}, {hessian.shape} and {mean_abs.shape}"
        )
    for name, value in (("weight", weight), ("hessian", hessian), ("act_mean_abs", mean_abs)):
        _finite(name, value)
    if (mean_abs < 0).any():
        raise ValueError("act_mean_abs must be >= 0 (the mean of |x_k| per input channel)")
    if np.abs(hessian - hessian.T).max(initial=0.0) > 1e-5 * np.abs(hessian).max(initial=0.0):
        raise ValueError("hessian must be symmetric (H = sum_r x_r^T x_r)")
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.rounding != "nearest":
        raise ValueError(
            f"AWQ compares deterministic quantizations: use rounding='nearest', got "
            f"rounding={spec.rounding!r}"
        )
    scale_shape(weight.shape, spec)


def _candidates(mean_abs: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas (G,), float32 scales (G, K)): a^alpha / sqrt(max min), a floored."""
    top = mean_abs.max()
    a = np.ones_like(mean_abs) if top == 0 else np.maximum(mean_abs, MEAN_ABS_FLOOR * top)
    alphas = np.arange(grid) / grid
    scales = a[None, :] ** alphas[:, None]
    scales /= np.sqrt(scales.max(axis=1) * scales.min(axis=1))[:, None]
    return alphas, scales.astype(np.float32)


@partial(jax.jit, static_argnums=1)
def _round_trips(scaled: jax.Array, spec: QuantSpec) -> jax.Array:
    """Q(w) = dequantize(quantize(w, spec)) for each (K, N) slice scaled[:, g, :]."""
    return jax.vmap(lambda w: dequantize(quantize(w, spec)), in_axes=1, out_axes=1)(scaled)


def _errors(
    weight: np.ndarray, hessian: np.ndarray, scales: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """err(s) = tr(dW^T H dW) for each row s of scales (G, K), in float64.

    The candidates lie side by side, dW of shape (K, G, N), so that H dW is one
    matrix product; a chunk of candidates holds at most `CHUNK_ELEMENTS` entries
    (or one candidate).
    """
    k = weight.shape[0]
    per_chunk = max(1, CHUNK_ELEMENTS // weight.size)
    weight32 = weight.astype(np.float32)[:, None, :]
    errors = []
    for start in range(0, len(scales), per_chunk):
        column = scales[start : start + per_chunk].T[:, :, None]
        quantized = np.asarray(_round_trips(jnp.asarray(column * weight32), spec), np.float64)
        delta = quantized / column.astype(np.float64) - weight[:, None, :]
        product = (hessian @ delta.reshape(k, -1)).reshape(delta.shape)
        errors.append(np.einsum("kgn,kgn->g", delta, product))
    return np.concatenate(errors)


def awq_scales(
    weight: ArrayLike,
    hessian: ArrayLike,
    act_mean_abs: ArrayLike,
    spec: QuantSpec,
    *,
    grid: int = 20,
) -> AWQResult:
    """The AWQ scales of one layer y = x @ W: the candidate s with the smallest err(s).

    The candidates are quantized together (one jitted, vmapped `quantize` /
    `dequantize` per chunk of candidates); their errors tr(dW^T H dW) are computed in float64 with
    W_hat(s) = Q(diag(s) W) / s (module docstring).

    Args:
      weight: (K, N) kernel (float32 or float64; diag(s) W is formed in float32).
      hessian: (K, K) symmetric input Gram matrix H = sum_r x_r^T x_r, or any
        positive multiple of it (e.g. the mean over rows).
      act_mean_abs: (K,) mean |x_k| of each input channel over the calibration rows.
      spec: the weight quantizer, any spec `kdq.quant.quantize` accepts for a
        (K, N) array (e.g. axes=(-1,), optionally group_size along K) with
        rounding="nearest".
      grid: the number of exponents alpha in {0, 1/grid, ..., (grid - 1)/grid}.

    Returns:
      An `AWQResult`: the scales s (float32), alpha, err(s) and err(1).

    Raises:
      ValueError: shapes that disagree, NaN or inf inputs, a negative mean,
        an asymmetric hessian, grid not an int >= 1, a stochastic spec, or a
        spec that does not fit the weight (e.g. group_size not dividing K).
    """
    weight = np.asarray(weight, np.float64)
    hessian = np.asarray(hessian, np.float64)
    mean_abs = np.asarray(act_mean_abs, np.float64)
    _check_inputs(weight, hessian, mean_abs, spec, grid)
    alphas, scales = _candidates(mean_abs, int(grid))
    errors = _errors(weight, hessian, scales, spec)
    best = int(np.argmin(errors))
    return AWQResult(
        scales=scales[best],
        alpha=float(alphas[best]),
        error=float(errors[best]),
        rtn_error=float(errors[0]),
    )
