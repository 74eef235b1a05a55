"""GPTQ: second-order post-training quantization of one Dense kernel.

GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") quantizes a kernel W (K inputs, N
outputs, y = x @ W) to minimise the layer's output error on calibration inputs
X (n rows):

    E(W_q) = tr((W - W_q)^T H (W - W_q)),   H = (2 / n) X^T X   (K x K).

Every output column n is an independent problem with the same Hessian H, so
the K input rows of W are quantized one after the other, for all N outputs at
once.

OBS / OBQ update. Quantizing row k to q = quant(w_k) and re-optimising the rows
not yet quantized (F, k in F) is the Optimal Brain Surgeon step with
Hinv = (H_FF)^-1:

    e = (w_k - q) / [Hinv]_kk,     w_j -= e [Hinv]_kj  (j in F, j != k),

which raises E by (w_k - q)^2 / [Hinv]_kk. Removing k from F downdates the
inverse, Hinv <- Hinv - Hinv[:, k] Hinv[k, :] / [Hinv]_kk (the inverse of the
Hessian of the remaining rows).

Cholesky form. With a fixed order 0, 1, ..., K-1 the downdates are the steps of
symmetric Gaussian elimination of H^-1, i.e. of its Cholesky factorisation
H^-1 = U^T U (U upper): since row i of U is zero left of column i, removing
rows 0..k-1 leaves U[k:, k:]^T U[k:, k:], whose first row is U_kk U[k, k:]. Hence
with err = (w_k - q) / U_kk the update is

    w_{k+1:} -= err U[k, k+1:],   and the error increase is err^2,

so one Cholesky factor replaces the K downdates (numerically stable, and the
reported `loss` is sum_k ||err_k||^2 = E(W_q) of the damped H).

Lazy blocks. Row k's update touches every later row; it is applied at once only
inside the current block of `block_size` rows. The updates of a finished block B
reach the rows after it in one matrix product, W[after] -= U[B, after]^T Err[B].
Inside a block the same is done with sub-blocks of 16 rows. With lazy groups
(below) a block also ends where a group starts, so that the group's rows hold
every earlier update when its scale is calibrated. The result is the same as
row-by-row updating, whatever `block_size` (up to float64 rounding order).

Damping. H += lambda * mean(diag(H)) * I (lambda = `damping`) keeps the
factorisation stable when X^T X is near singular. If the Cholesky
factorisation still fails, lambda is multiplied by 10 (starting from 1e-6 when
it is 0) up to max(1, lambda); the damping used is warned about and returned.
Inputs that are always zero (H_kk = 0, "dead") get H_kk = 1 and W[k, :] = 0:
they never reach the output.

Act order. With `act_order`, rows are processed by decreasing H_kk (the inputs
with the most energy first, while many rows are still free to absorb their
error); the integers are returned in the original row order.

Scales, using kdq's quantizer (`kdq.quant.calibrate` and
q = clip(round(w / s) + z, qmin, qmax), round half to even):
  * without `group_size`: the per-channel scale of the whole weight, before
    any update (dead rows zeroed);
  * with `group_size` g, without act order ("lazy groups"): the scale of the
    group of rows [G g, (G + 1) g) is calibrated on the current weights of those
    rows, i.e. with every update of the rows before them applied, when row G g
    is reached;
  * with `group_size` and act order ("static groups"): every group's scale is
    calibrated once on the weights before any update; groups stay contiguous
    in the original row order (the layout of `kdq.quant.quantize`), however
    the rows are processed.
Either way the result is an ordinary `QArray` whose integers are those of the
updated weights: dequantize(result.qarray) is the GPTQ weight.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.typing import ArrayLike

from kdq.quant.numerics import calibrate
from kdq.quant.qarray import QArray
from kdq.quant.spec import QuantSpec

_MAX_DAMPING = 1.0
_FIRST_RETRY_DAMPING = 1e-6
_SYMMETRY_TOLERANCE = 1e-3
_SUB_BLOCK = 16
_PIVOT_TOLERANCE = float(np.finfo(np.float64).eps)


@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """The outcome of `gptq_quantize`.

    Attributes:
      qarray: the quantized weight, shape (K, N), with the scale layout of
        `kdq.quant.quantize(weight, spec)`.
      damping: the relative damping lambda actually used (larger than the one
        asked for when the factorisation needed more).
      loss: the proxy loss sum_k ||w_k - q_k||^2 / [H_F^-1]_kk over the rows k
        in processing order (w_k the updated row, q_k its dequantized value, H_F
        the damped Hessian of the rows not yet quantized at step k). It equals
        tr(dW^T H_lambda dW), dW = W - dequantize(qarray)
        (W with dead rows zeroed, H_lambda the damped Hessian), up to rounding.
    """

    qarray: QArray
    damping: float
    loss: float


def _non_finite_error(name: str, values: np.ndarray) -> ValueError:
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    return ValueError(
        f"{name} contains {bad} non-finite value(s) (NaN or inf) out of {values.size}; "
        f"GPTQ needs a finite {name}: find where they come from"
    )


def _check_arguments(
    weight: ArrayLike,
    hessian: ArrayLike,
    spec: QuantSpec,
    damping: float,
    block_size: int,
    act_order: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Validates the arguments; returns (weight, symmetric hessian) in float64."""
    w = np.array(weight, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(
            f"weight must be a 2-D Dense kernel (in_features K, out_features N), got shape "
            f"{w.shape}; reshape other kernels to (K, N) with K the contracted axis"
        )
    if w.size == 0:
        raise ValueError(f"weight must not be empty, got shape {w.shape}")
    k = w.shape[0]
    if h.shape != (k, k):
        raise ValueError(
            f"hessian must have shape (K, K) = ({k}, {k}) for a weight of shape {w.shape}, got "
            f"{h.shape}; pass H = (2 / n) X^T X of the layer's n input rows X (n, {k})"
        )
    if not np.isfinite(w).all():
        raise _non_finite_error("weight", w)
    if not np.isfinite(h).all():
        raise _non_finite_error("hessian", h)
    asymmetry = float(np.abs(h - h.T).max(initial=0.0))
    if asymmetry > _SYMMETRY_TOLERANCE * float(np.abs(h).max(initial=0.0)):
        raise ValueError(
            f"hessian is not symmetric (max |H - H^T| = {asymmetry:g}); pass H = (2 / n) X^T X"
        )
    if len(spec.axes) != 1 or spec.axes[0] not in (-1, 1):
        raise ValueError(
            f"gptq_quantize quantizes per output channel: spec.axes must be (-1,) or (1,) for a "
            f"(K, N) kernel, got axes={spec.axes}; use QuantSpec(axes=(-1,), ...)"
        )
    if spec.group_size is not None and k % spec.group_size:
        raise ValueError(
            f"group_size={spec.group_size} does not divide K={k} (the contraction axis, axis 0 "
            f"of the weight of shape {w.shape}); use a divisor of {k}"
        )
    if spec.rounding != "nearest":
        raise ValueError(
            f"gptq_quantize rounds to nearest, got rounding={spec.rounding!r}; use a spec with "
            "rounding='nearest' (GPTQ compensates the rounding error deterministically)"
        )
    if isinstance(damping, bool) or not isinstance(damping, int | float | np.integer | np.floating):
        raise ValueError(f"damping must be a float >= 0, got damping={damping!r}")
    if not (np.isfinite(damping) and damping >= 0):
        raise ValueError(
            f"damping must be a finite float >= 0 (relative to mean(diag(H))), got "
            f"damping={damping!r}; the usual value is 0.01"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise ValueError(f"block_size must be an int >= 1, got block_size={block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got block_size={block_size}; e.g. 128")
    if not isinstance(act_order, bool | np.bool_):
        raise ValueError(f"act_order must be a bool, got act_order={act_order!r}")
    return w, (h + h.T) / 2


def _factor(damped: np.ndarray) -> np.ndarray | None:
    """Upper U with damped^-1 = U^T U, or None if damped is not positive definite.

    A factorisation whose smallest squared pivot is below K * eps * max(diag)
    (float64 eps: the matrix is singular to working precision) counts as failed.
    """
    eye = np.eye(damped.shape[0])
    try:
        lower = scipy.linalg.cholesky(damped, lower=True)
        if np.min(np.diag(lower)) ** 2 <= _PIVOT_TOLERANCE * len(eye) * np.max(np.diag(damped)):
            return None
        lower_inv = scipy.linalg.solve_triangular(lower, eye, lower=True)
        upper = scipy.linalg.cholesky(lower_inv.T @ lower_inv, lower=False)
    except np.linalg.LinAlgError:
        return None
    return upper if np.isfinite(upper).all() else None


def _inverse_cholesky(h: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """Upper U with (H + lambda mean(diag H) I)^-1 = U^T U, and the lambda used.

    Tries `damping`, then 10x larger ones (from 1e-6 when it is 0) up to
    max(1, damping) until the factorisation succeeds.

    Raises:
      ValueError: no damping up to the limit makes H positive definite.
    """
    mean_diag = float(np.mean(np.diag(h)))
    limit = max(_MAX_DAMPING, damping)
    current = damping
    while True:
        upper = _factor(h + current * mean_diag * np.eye(h.shape[0]))
        if upper is not None:
            return upper, current
        if current >= limit:
            raise ValueError(
                f"hessian is not positive definite even with damping={current:g} (relative to "
                f"mean(diag(H)) = {mean_diag:g}); pass a symmetric positive semi-definite "
                "H = (2 / n) X^T X"
            )
        current = min(10 * current if current > 0 else _FIRST_RETRY_DAMPING, limit)


def _scale_rows(values: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """kdq's calibration of `values` (rows, N) under `spec`: (scale, zero point) float32.

    The zero point is 0 for a symmetric spec.
    """
    scale, zero_point = calibrate(values.astype(np.float32), spec)
    scale = np.asarray(scale, np.float32)
    if zero_point is None:
        return scale, np.zeros_like(scale)
    return scale, np.asarray(zero_point).astype(np.float32)


def _quantize_block(
    w: np.ndarray,
    upper: np.ndarray,
    q: np.ndarray,
    i1: int,
    i2: int,
    scale: np.ndarray,
    zero: np.ndarray,
    row_group: np.ndarray,
    spec: QuantSpec,
) -> np.ndarray:
    """Quantizes rows [i1, i2) of w into q, updating the rows of the block in place.

    Row k gets q_k = clip(round(w_k / s) + z, qmin, qmax) with its group's
    scale s and zero point z, and err_k = (w_k - (q_k - z) s) / U_kk. The
    updates w_j -= err_k U_kj reach the rows of the block in sub-blocks of
    `_SUB_BLOCK` rows (eagerly inside a sub-block, by one matrix product for the
    rest of the block); the rows after the block are left to the caller.

    Returns:
      err: (i2 - i1, N), the scaled errors err_k of the block's rows.
    """
    err = np.empty((i2 - i1, w.shape[1]), np.float64)
    for j1 in range(i1, i2, _SUB_BLOCK):
        j2 = min(j1 + _SUB_BLOCK, i2)
        for row in range(j1, j2):
            s = scale[row_group[row]].astype(np.float64)
            z = zero[row_group[row]].astype(np.float64)
            q[row] = np.clip(np.rint(w[row] / s) + z, spec.qmin, spec.qmax)
            e = err[row - i1]
            e[:] = (w[row] - (q[row] - z) * s) / upper[row, row]
            w[row + 1 : j2] -= np.outer(upper[row, row + 1 : j2], e)
        w[j2:i2] -= upper[j1:j2, j2:i2].T @ err[j1 - i1 : j2 - i1]
    return err


def gptq_quantize(
    weight: ArrayLike,
    hessian: ArrayLike,
    spec: QuantSpec,
    *,
    damping: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> GPTQResult:
    """Quantizes a Dense kernel with GPTQ (see the module docstring for the math).

    Args:
      weight: (K, N) float kernel, y = x @ W.
      hessian: (K, K) symmetric positive semi-definite H = (2 / n) sum_r x_r x_r^T
        over the n calibration rows; any positive multiple gives the same result.
      spec: the weight quantizer: per output channel (axes (-1,) or (1,)),
        optionally with a `group_size` dividing K (groups along the contraction
        axis), symmetric or affine, any calibration, rounding "nearest".
      damping: lambda in H += lambda * mean(diag(H)) * I.
      block_size: rows per lazy block update (does not change the result).
      act_order: process rows by decreasing diag(H); groups are then static.

    Returns:
      A `GPTQResult` with the `QArray`, the damping used and the proxy loss.

    Raises:
      ValueError: weight not 2-D, hessian not (K, K) or not symmetric, non-finite
        values, spec not per output channel, group_size not dividing K, stochastic
        rounding, damping < 0, block_size < 1, or a Hessian that no damping up to
        max(1, damping) makes positive definite.

    Warns:
      UserWarning: when the factorisation needed a larger damping than `damping`.
    """
    w, h = _check_arguments(weight, hessian, spec, damping, block_size, act_order)
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0

    lazy_groups = spec.group_size is not None and not act_order
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        w, h = w[perm], h[np.ix_(perm, perm)]
    else:
        perm = np.arange(k)
    upper, used = _inverse_cholesky(h, float(damping))
    if used != damping:
        warnings.warn(
            f"the Hessian is singular or indefinite: its Cholesky factorisation failed with "
            f"damping={damping:g}; used damping={used:g}",
            UserWarning,
            stacklevel=2,
        )

    group_size = spec.group_size or k
    if lazy_groups:
        scale = np.empty((k // group_size, n), np.float32)
        zero = np.empty((k // group_size, n), np.float32)
    else:
        original = np.empty_like(w)
        original[perm] = w
        scale, zero = _scale_rows(original, spec)
    row_group = perm // group_size
    row_spec = dataclasses.replace(spec, group_size=None)

    starts = set(range(0, k, block_size))
    if lazy_groups:
        starts |= set(range(0, k, group_size))
    starts = sorted(starts)
    q = np.empty((k, n), np.float64)
    loss = 0.0
    for i1, i2 in zip(starts, [*starts[1:], k], strict=True):
        if lazy_groups and i1 % group_size == 0:
            g = i1 // group_size
            s, z = _scale_rows(w[i1 : i1 + group_size], row_spec)
            scale[g], zero[g] = s[0], z[0]
        err = _quantize_block(w, upper, q, i1, i2, scale, zero, row_group, spec)
        loss += float(np.sum(err * err))
        w[i2:] -= upper[i1:i2, i2:].T @ err

    qvalue = np.empty_like(q)
    qvalue[perm] = q
    qarray = QArray(
        qvalue=jnp.asarray(qvalue.astype(np.int32)).astype(spec.dtype),
        scale=jnp.asarray(scale, jnp.float32),
        zero_point=None
        if spec.symmetric
        else jnp.asarray(zero.astype(np.int32)).astype(spec.dtype),
        spec=spec,
    )
    return GPTQResult(qarray=qarray, damping=used, loss=loss)
