"""SmoothQuant's per-channel migration scales (Xiao et al. 2023).

SmoothQuant ("SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models") makes the input of a layer y = x @ W (W: K x N)
easier to quantize by moving its per-channel outliers into the weight: input
channel k is divided by s_k and weight row k multiplied by it,

    x' = x / s,   W' = diag(s) W,   x' @ W' = x @ W.

With m_k = max_r |x_rk| over the calibration rows and w_k = max_n |W_kn|,

    s_k = m_k^alpha / w_k^(1 - alpha),

so that after migration channel k's activation maximum is
m_k^(1 - alpha) w_k^(1 - alpha) and its weight maximum m_k^alpha w_k^alpha:
alpha = 0.5 balances the two, alpha = 1 moves all of the range into the
weight (s_k = m_k), alpha = 0 none of it (s_k = 1 / w_k). A channel with
m_k = 0 or w_k = 0 carries nothing to migrate and keeps s_k = 1; every scale
is clipped to `SCALE_RANGE` = [1e-5, 1e5] so that x / s and diag(s) W stay
finite and far from float32 underflow.
"""

from __future__ import annotations

import numbers

import numpy as np
from jax.typing import ArrayLike

SCALE_RANGE = (1e-5, 1e5)


def _check_alpha(alpha: object) -> float:
    if (
        isinstance(alpha, bool | np.bool_)
        or not isinstance(alpha, numbers.Real)
        or not 0.0 <= float(alpha) <= 1.0
    ):
        raise ValueError(
            f"SmoothQuant alpha must be a number in [0, 1] (0.5 balances activations and "
            f"weights), got alpha={alpha!r}"
        )
    return float(alpha)


def smoothquant_scales(act_absmax: ArrayLike, weight: ArrayLike, alpha: float = 0.5) -> np.ndarray:
    """s_k = max|x_k|^alpha / max_n |W_kn|^(1 - alpha) (module docstring), in float64.

    The layer then computes (x / s) @ (diag(s) W).

    Args:
      act_absmax: (K,) max |x_k| of each input channel over the calibration rows.
      weight: (K, N) kernel of y = x @ W.
      alpha: migration strength in [0, 1].

    Returns:
      float64 array (K,) of scales in `SCALE_RANGE`; 1 for channels whose
      activation or weight maximum is 0.

    Raises:
      ValueError: alpha is not a number in [0, 1]; weight is not 2-D or
        act_absmax not (K,); act_absmax is negative or not finite; weight is
        not finite.

    >>> smoothquant_scales(np.array([4.0, 0.0]), np.array([[1.0, -0.25], [2.0, 1.0]]))
    array([2., 1.])
    """
    alpha = _check_alpha(alpha)
    act_absmax = np.asarray(act_absmax, np.float64)
    weight = np.asarray(weight, np.float64)
    if weight.ndim != 2 or act_absmax.shape != (weight.shape[0],):
        raise ValueError(
            f"act_absmax must be (K,) for a (K, N) weight, got act_absmax of shape "
            f"{act_absmax.shape} and weight of shape {weight.shape}: measure one maximum per "
            "input channel (weight row)"
        )
    if not np.isfinite(act_absmax).all() or (act_absmax < 0).any():
        raise ValueError(
            "act_absmax must be finite and >= 0 (max |x| per input channel), got "
            f"{int((~np.isfinite(act_absmax) | (act_absmax < 0)).sum())} bad value(s); check "
            "the calibration statistics"
        )
    if not np.isfinite(weight).all():
        raise ValueError(
            f"weight must be finite, got {int((~np.isfinite(weight)).sum())} NaN or inf entries"
        )
    weight_absmax = np.abs(weight).max(axis=1)
    live = (act_absmax > 0) & (weight_absmax > 0)
    scales = np.ones_like(act_absmax)
    scales[live] = act_absmax[live] ** alpha / weight_absmax[live] ** (1.0 - alpha)
    return np.clip(scales, *SCALE_RANGE)
