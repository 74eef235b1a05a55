"""Randomised Hadamard rotations (QuaRot, Ashkboos et al. 2024).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I. With d a
vector of random signs, R = diag(d) H / sqrt(n) is orthogonal, and rotating a
layer's input spreads every outlier over all channels: the unit vector e_k
becomes e_k R, all of whose entries have magnitude 1 / sqrt(n). Since
(x R)(R^T W) = x W, the rotated layer computes the same function, while both
its input x R and its weight R^T W are far easier to quantize.

Orders built here: n = 2^k * m with m in {1, 12, 20, 28, 44}: the Kronecker
product of Sylvester's matrix of order 2^k and a Paley matrix of order m
(Paley's construction I: order q + 1 for a prime q = 3 mod 4, here q = 11,
19, 43; order 28 from q = 27 is not prime and is left out). This covers the
usual transformer widths (128, 256, 384 = 12 * 32, 512, 768, 1536, 3072, ...).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PALEY_PRIMES = (11, 19, 43)  # orders 12, 20, 44


def _paley(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)])
    jacobsthal = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    skew = np.zeros((q + 1, q + 1), np.int64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return skew + np.eye(q + 1, dtype=np.int64)


def supported_orders(limit: int = 4096) -> list[int]:
    """The orders <= limit that `hadamard_matrix` builds."""
    bases = (1, *(q + 1 for q in PALEY_PRIMES))
    return sorted({b * 2**k for b in bases for k in range(13) if b * 2**k <= limit})


@functools.lru_cache(maxsize=32)
def hadamard_matrix(n: int) -> np.ndarray:
    """A +-1 Hadamard matrix of order n (H H^T = n I).

    Args:
      n: the order.

    Returns:
      The (n, n) read-only int8 matrix (cached).

    Raises:
      ValueError: n is not 2^k * m for m in {1, 12, 20, 44}.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"a Hadamard order must be an int >= 1, got {n!r}")
    for q in (1, *PALEY_PRIMES):
        base = 1 if q == 1 else q + 1
        power = n // base
        if n % base == 0 and power & (power - 1) == 0:
            matrix = np.ones((1, 1), np.int64) if q == 1 else _paley(q)
            sylvester = np.ones((1, 1), np.int64)
            while sylvester.shape[0] < power:
                sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
            result = np.kron(sylvester, matrix).astype(np.int8)
            result.flags.writeable = False
            return result
    raise ValueError(
        f"no Hadamard matrix of order {n} is built here: orders are 2^k * m with m in "
        f"(1, 12, 20, 44), e.g. {supported_orders(2048)[:12]}...; exclude the layer from "
        "rotation or pad it"
    )


def hadamard_signs(n: int, *, seed: int) -> np.ndarray:
    """The seeded random signs d of R = diag(d) H / sqrt(n).

    Args:
      n: the order (one `hadamard_matrix` builds).
      seed: the random seed.

    Returns:
      (n,) float32 array of +-1.
    """
    hadamard_matrix(n)  # refuses an order it cannot build
    signs = np.random.default_rng(seed).integers(0, 2, size=n) * 2 - 1
    return signs.astype(np.float32)


def rotation_matrix(signs: np.ndarray) -> np.ndarray:
    """R = diag(d) H / sqrt(n), orthogonal (R R^T = I).

    Args:
      signs: (n,) the signs d.

    Returns:
      (n, n) float64 matrix.
    """
    signs = np.asarray(signs, np.float64)
    return signs[:, None] * hadamard_matrix(signs.shape[0]) / np.sqrt(signs.shape[0])


def rotate(x: jax.Array, signs: jax.Array) -> jax.Array:
    """x R along x's last axis: ((x * d) @ H) / sqrt(n), computed in float32.

    Args:
      x: (..., n) array; n is static under jit, H a constant.
      signs: (n,) the signs d (may be traced).

    Returns:
      The rotated array, in x's dtype.
    """
    n = x.shape[-1]
    hadamard = jnp.asarray(hadamard_matrix(n), jnp.float32)
    scaled = x.astype(jnp.float32) * jnp.asarray(signs, jnp.float32)
    out = jnp.matmul(scaled, hadamard, precision=jax.lax.Precision.HIGHEST) / np.sqrt(n)
    return out.astype(x.dtype)


def rotate_weight(weight: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """R^T W, so that rotate(x, signs) @ (R^T W) == x @ W.

    Args:
      weight: (K, N) kernel.
      signs: (K,) the signs d of R.

    Returns:
      (K, N) float64 rotated kernel.
    """
    return rotation_matrix(signs).T @ np.asarray(weight, np.float64)
