"""Randomised Hadamard rotations for incoherence processing (QuaRot).

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated
LLMs") rotates the input space of a Dense layer y = x @ W (W: K x N) by an
orthogonal R (K x K, R R^T = I):

    x' = x R,   W' = R^T W,   x' @ W' = x R R^T W = x @ W,

so the float function is unchanged while activations and weights lose their
outliers: for the rotations below every basis vector e_i maps to a vector with
all |entries| = 1 / sqrt(K), so a lone outlier's max / rms falls from sqrt(K)
to 1, and both x' and W' quantize with a smaller range.

Hadamard matrices. A Hadamard matrix H of order n has entries +-1 and
H H^T = n I. `hadamard_matrix` builds H = S_{2^k} (x) P_m (Kronecker product)
for n = 2^k * m, from

  * Sylvester: S_1 = [1], S_{2j} = [[S_j, S_j], [S_j, -S_j]];
  * Paley I: order m = q + 1 for a prime q = 3 (mod 4) (12, 20, 24, 32, 44,
    ...): H = I + [[0, 1^T], [-1, Q]], with the Jacobsthal matrix
    Q_ij = chi(j - i), chi the quadratic character mod q (Q is skew-symmetric);
  * Paley II: order m = 2 (q + 1) for a prime q = 1 (mod 4) (12, 28, 36, 60,
    ...): C = [[0, 1^T], [1, Q]] (Q symmetric) and
    H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].

A Kronecker product of Hadamard matrices is Hadamard, since
(A (x) B)(A (x) B)^T = (A A^T) (x) (B B^T). The smallest Paley order m with
n / m a power of 2 is used. This covers the usual transformer widths: 64,
96 = 8 * 12, 128, 384 = 32 * 12, 768 = 64 * 12, 1536 = 128 * 12, 3072 = 256 * 12,
4096; it does not cover orders such as 52, 92 or 100 (no prime of either form).

Random signs. With d a seeded vector of random signs, R = diag(d) H / sqrt(n) is
orthogonal: R R^T = diag(d) H H^T diag(d) / n = I. Applying it needs only H:

    x R = ((x * d) @ H) / sqrt(n)              (`rotate`, any leading axes),
    R^T W = (H^T @ (d[:, None] * W)) / sqrt(n)  (`rotate_weight`).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

PALEY_ORDERS = "12, 20, 24, 28, 32, 36, 44, 48, 60, ..."


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_order(n: int) -> tuple[int, int] | None:
    """(m, construction 1 or 2) for the smallest Paley order m with n / m a power of 2."""
    odd, twos = n, 0
    while odd % 2 == 0:
        odd, twos = odd // 2, twos + 1
    for j in range(2, twos + 1):
        m = 2**j * odd
        if _is_prime(m - 1):
            return m, 1
        if j == 2 and _is_prime(m // 2 - 1):
            return m, 2
    return None


def _is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def _is_supported(n: int) -> bool:
    return _is_power_of_two(n) or _paley_order(n) is not None


def _check_order(n: object) -> int:
    """n as an int; ValueError unless it is an order `hadamard_matrix` builds."""
    if isinstance(n, bool | np.bool_) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"a Hadamard order must be an int >= 1, got n={n!r}")
    n = int(n)
    if not _is_supported(n):
        below = next(k for k in range(n - 1, 0, -1) if _is_supported(k))
        above = next(k for k in range(n + 1, 2 * n + 1) if _is_supported(k))
        raise ValueError(
            f"no Hadamard matrix of order {n} is built here: orders are n = 2^k * m with "
            f"m = 1, m = q + 1 for a prime q = 3 mod 4, or m = 2 (q + 1) for a prime "
            f"q = 1 mod 4 (m in 1, {PALEY_ORDERS}); the nearest orders are {below} and "
            f"{above}: pad the dimension to one of them, or leave the layer unrotated"
        )
    return n


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """Q_ij = chi(j - i) mod q: 0 on the diagonal, +1 for quadratic residues, else -1."""
    residue = np.zeros(q, bool)
    residue[(np.arange(1, q) ** 2) % q] = True
    chi = np.where(residue, 1, -1).astype(np.int8)
    chi[0] = 0
    # Row i is chi shifted right by i: a window of chi repeated twice (a circulant).
    windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([chi, chi]), q)
    return windows[q - np.arange(q) % q]


def _paley(m: int, construction: int) -> np.ndarray:
    q = m - 1 if construction == 1 else m // 2 - 1
    core = np.zeros((q + 1, q + 1), np.int8)
    core[0, 1:] = 1
    core[1:, 0] = -1 if construction == 1 else 1
    core[1:, 1:] = _jacobsthal(q)
    diagonal = np.arange(q + 1)
    if construction == 1:
        core[diagonal, diagonal] = 1
        return core
    h = np.kron(core, np.array([[1, 1], [1, -1]], np.int8))
    blocks = h.reshape(q + 1, 2, q + 1, 2)
    blocks[diagonal, :, diagonal, :] = np.array([[1, -1], [-1, -1]], np.int8)
    return h


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> np.ndarray:
    if _is_power_of_two(n):
        h = _sylvester(n)
    else:
        m, construction = _paley_order(n)
        h = np.kron(_sylvester(n // m), _paley(m, construction))
    h.flags.writeable = False
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """A Hadamard matrix of order n: entries +-1, H H^T = n I.

    H = S_{2^k} (x) P_m for n = 2^k * m (module docstring). Cached and
    read-only: copy it to modify it.

    Args:
      n: the order: a power of 2, or 2^k * m with m = q + 1 for a prime
        q = 3 mod 4, or m = 2 (q + 1) for a prime q = 1 mod 4.

    Returns:
      int8 array (n, n) of +-1.

    Raises:
      ValueError: n is not an int >= 1, or not an order built here (the
        message gives the supported form and the nearest supported orders).

    >>> hadamard_matrix(2)
    array([[ 1,  1],
           [ 1, -1]], dtype=int8)
    >>> h = hadamard_matrix(12).astype(int)
    >>> bool((h @ h.T == 12 * np.eye(12)).all())
    True
    """
    return _hadamard(_check_order(n))


def hadamard_signs(n: int, seed: int) -> np.ndarray:
    """The seeded random signs d of the rotation R = diag(d) H / sqrt(n).

    Args:
      n: the order (one `hadamard_matrix` builds).
      seed: a non-negative int seeding `numpy.random.default_rng`: the same
        seed gives the same signs.

    Returns:
      float32 array (n,) of +-1.

    Raises:
      ValueError: n is not a supported order, or seed is not a non-negative int.
    """
    n = _check_order(n)
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={seed!r}")
    bits = np.random.default_rng(int(seed)).integers(0, 2, size=n)
    return (2 * bits - 1).astype(np.float32)


def _check_signs(signs: ArrayLike, size: int | None, what: str) -> int:
    """The length of a sign vector; ValueError unless it is +-1 (when concrete) of `size`."""
    shape = np.shape(signs)
    if len(shape) != 1 or (size is not None and shape[0] != size):
        expected = "a vector" if size is None else f"a vector of length {size}"
        raise ValueError(
            f"signs must be {expected} ({what}), got shape {shape}; "
            "make them with hadamard_signs(n, seed)"
        )
    if not isinstance(signs, jax.core.Tracer):
        values = np.asarray(signs)
        if not np.isin(values, (-1, 1)).all():
            raise ValueError(
                "signs must hold only +1 and -1, got other values; make them with "
                "hadamard_signs(n, seed)"
            )
    return shape[0]


def rotation_matrix(signs: ArrayLike) -> np.ndarray:
    """R = diag(d) H / sqrt(n) for the signs d, in float64 (R R^T = I).

    Args:
      signs: the sign vector d (n,) of +-1.

    Returns:
      float64 array (n, n).

    Raises:
      ValueError: signs is not a +-1 vector, or n is not a supported order.
    """
    n = _check_signs(signs, None, "the diagonal of diag(d)")
    d = np.asarray(signs, np.float64)
    return d[:, None] * hadamard_matrix(n) / np.sqrt(n)


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """The orthogonal R = diag(d) H / sqrt(n) with d = `hadamard_signs(n, seed)`.

    Args:
      n: the order (one `hadamard_matrix` builds).
      seed: the seed of the signs.

    Returns:
      float64 array (n, n) with R R^T = I.

    Raises:
      ValueError: as `hadamard_signs`.
    """
    return rotation_matrix(hadamard_signs(n, seed))


def rotate(x: ArrayLike, signs: ArrayLike) -> jax.Array:
    """x R along x's last axis: ((x * d) @ H) / sqrt(n), with R = diag(d) H / sqrt(n).

    Only H is materialised, as a numpy constant; x and the signs may be traced
    (inside `jit`). Computed in float32 at full matmul precision.

    Args:
      x: array (..., n).
      signs: the sign vector d (n,) of +-1, from `hadamard_signs`.

    Returns:
      x R, the shape of x, in x's dtype (float32 for a non-float x).

    Raises:
      ValueError: x has no axis, signs is not a +-1 vector of length
        x.shape[-1], or that is not a supported order.
    """
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a last axis to rotate (..., n), got shape {x.shape}")
    n = _check_signs(signs, x.shape[-1], f"the last axis of x, shape {x.shape}")
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    h = jnp.asarray(hadamard_matrix(n), jnp.float32)
    scaled = x.astype(jnp.float32) * jnp.asarray(signs, jnp.float32)
    out = jnp.matmul(scaled, h, precision=jax.lax.Precision.HIGHEST) / np.float32(np.sqrt(n))
    return out.astype(dtype)


def rotate_weight(weight: ArrayLike, signs: ArrayLike) -> np.ndarray:
    """R^T W for a Dense kernel W (n, N): (H^T @ (d[:, None] * W)) / sqrt(n), in float64.

    rotate(x, d) @ rotate_weight(W, d) = x R R^T W = x @ W.

    Args:
      weight: kernel (n, N) of y = x @ W (concrete).
      signs: the sign vector d (n,) of +-1, the same as for `rotate`.

    Returns:
      float64 array (n, N).

    Raises:
      ValueError: weight is not 2-D, signs is not a +-1 vector of length n, or
        n is not a supported order.
    """
    weight = np.asarray(weight, np.float64)
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D kernel (n, N), got shape {weight.shape}")
    n = _check_signs(signs, weight.shape[0], f"the rows of weight, shape {weight.shape}")
    d = np.asarray(signs, np.float64)
    return hadamard_matrix(n).T.astype(np.float64) @ (d[:, None] * weight) / np.sqrt(n)
