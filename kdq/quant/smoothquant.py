"""SmoothQuant's per-channel migration scales (Xiao et al. 2023).

For a layer y = x W (W: (K, N)) whose input has outlier channels, divide
input channel k by s_k and multiply weight row k by it: (x / s) (diag(s) W) = x W.
With m_k = max |x_k| over the calibration rows and w_k = max_n |W_kn|,

    s_k = m_k^alpha / w_k^(1 - alpha),

so after migration channel k's activation maximum is m_k^(1-alpha) w_k^(1-alpha)
and its weight maximum m_k^alpha w_k^alpha: alpha = 0.5 balances the two
(alpha = 1 moves all the difficulty into the weights). Channels with m_k = 0
or w_k = 0 keep s_k = 1; scales are clipped to [1e-5, 1e5].
"""

from __future__ import annotations

import numpy as np

SCALE_RANGE = (1e-5, 1e5)


def smoothquant_scales(act_absmax, weight, alpha: float = 0.5) -> np.ndarray:
    """s (K,) = max|x_k|^alpha / max_n |W_kn|^(1 - alpha) (module docstring), float64.

    Args:
      act_absmax: (K,) max |x_k| of each input channel over the calibration rows.
      weight: (K, N) kernel.
      alpha: migration strength in [0, 1].

    Returns:
      (K,) float64 scales s > 0.

    Raises:
      ValueError: alpha outside [0, 1], shapes that disagree, or maxima that
        are negative or not finite.
    """
    act_absmax = np.asarray(act_absmax, np.float64)
    weight = np.asarray(weight, np.float64)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise ValueError(f"SmoothQuant alpha must be a number in [0, 1], got alpha={alpha!r}")
    if weight.ndim != 2 or act_absmax.shape != (weight.shape[0],):
        raise ValueError(
            f"act_absmax {act_absmax.shape} must be (K,) for a (K, N) weight, got weight "
            f"{weight.shape}"
        )
    if not np.isfinite(act_absmax).all() or (act_absmax < 0).any():
        raise ValueError("act_absmax must be finite and >= 0 (max |x| per input channel)")
    if not np.isfinite(weight).all():
        raise ValueError("the weight has NaN or inf entries")
    weight_absmax = np.abs(weight).max(axis=1)
    live = (act_absmax > 0) & (weight_absmax > 0)
    scales = np.ones_like(act_absmax)
    scales[live] = act_absmax[live] ** alpha / weight_absmax[live] ** (1 - alpha)
    return np.clip(scales, *SCALE_RANGE)
