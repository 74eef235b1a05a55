"""AWQ's activation-aware per-channel scale search (Lin et al. 2024).

Weight-only quantization of y = x W (W: (K, N)) protects the weights of
salient input channels by scaling them up before rounding and the input
down: W_hat(s) = diag(1/s) Q(diag(s) W), with Q the weight quantizer. AWQ
searches s = a^alpha over alpha in {0, 1/grid, ..., (grid - 1)/grid}, with
a_k = mean |x_k| over the calibration rows, each candidate normalised to
s / sqrt(max(s) min(s)), and keeps the one with the smallest output error.
Over the calibration rows x_r that error is, exactly,

    err(s) = sum_r ||x_r W_hat(s) - x_r W||^2 = n tr(dW^T H dW),
    dW = W_hat(s) - W,   H = (1/n) sum_r x_r x_r^T,

so the search needs the layer's input Hessian H, not the rows. alpha = 0
(s = 1, plain round to nearest) is a candidate: on the calibration data AWQ
is never worse than round to nearest.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kdq.quant.numerics import fake_quant
from kdq.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class AWQResult:
    """The chosen scales s (K,), their exponent alpha, err(s) and err(1) (per row, mean)."""

    scales: np.ndarray
    alpha: float
    error: float
    rtn_error: float


def awq_scales(weight, hessian, act_mean_abs, spec: QuantSpec, *, grid: int = 20) -> AWQResult:
    """The AWQ scales of one layer (module docstring).

    Args:
      weight: (K, N) kernel.
      hessian: (K, K) H = (1/n) sum_r x_r x_r^T of the layer's input.
      act_mean_abs: (K,) mean |x_k| of each input channel.
      spec: the weight spec (per channel, optionally per group along K).
      grid: number of exponents searched.

    Returns:
      The `AWQResult`: scales s, exponent alpha, err(s) and err(1) (mean
      squared output error per calibration row, through the Hessian).

    Raises:
      ValueError: shapes that disagree, NaN / inf statistics, or grid < 1.
    """
    weight = np.asarray(weight, np.float64)
    hessian = np.asarray(hessian, np.float64)
    mean_abs = np.asarray(act_mean_abs, np.float64)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be an int >= 1, got grid={grid!r}")
    k = weight.shape[0] if weight.ndim == 2 else None
    if k is None or hessian.shape != (k, k) or mean_abs.shape != (k,):
        raise ValueError(
            f"AWQ needs weight (K, N), hessian (K, K) and act_mean_abs (K,), got "
            f"{weight.shape}, {hessian.shape}, {mean_abs.shape}"
        )
    if not all(np.isfinite(a).all() for a in (weight, hessian, mean_abs)):
        raise ValueError("AWQ's weight and statistics must be finite (no NaN or inf)")
    alphas = np.arange(grid) / grid
    base = np.maximum(mean_abs, 1e-8)
    candidates = base[None, :] ** alphas[:, None]
    candidates /= np.sqrt(candidates.max(axis=1) * candidates.min(axis=1))[:, None]
    errors = np.asarray(
        _errors(
            jnp.asarray(weight, jnp.float32),
            jnp.asarray(candidates, jnp.float32),
            jnp.asarray(hessian, jnp.float32),
            spec,
        )
    )
    best = int(np.argmin(errors))
    return AWQResult(
        scales=candidates[best],
        alpha=float(alphas[best]),
        error=float(errors[best]),
        rtn_error=float(errors[0]),
    )


@jax.jit(static_argnames="spec")
def _errors(weight, candidates, hessian, spec):
    """tr(dW^T H dW) for each candidate s (one row of `candidates`)."""

    def error(s):
        w_hat = fake_quant(s[:, None] * weight, spec) / s[:, None]
        delta = w_hat - weight
        return jnp.sum(delta * jnp.matmul(hessian, delta, precision=jax.lax.Precision.HIGHEST))

    return jax.lax.map(error, candidates)
