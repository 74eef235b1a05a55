"""Hadamard matrices and randomised Hadamard rotations (`kdq.quant.rotation`).

References: the defining identities (entries +-1, H H^T = n I, R R^T = I), the
rotation written out as the dense product x @ diag(d) H / sqrt(n) in float64, the
closed form |e_i R| = 1 / sqrt(n), and the documented set of orders recomputed
here from its definition (n = 2^k m, m = 1, q + 1 for a prime q = 3 mod 4, or
2 (q + 1) for a prime q = 1 mod 4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant.rotation import (
    hadamard_matrix,
    hadamard_signs,
    random_hadamard,
    rotate,
    rotate_weight,
    rotation_matrix,
)

WIDTHS = (64, 96, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def _prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _documented_order(n: int) -> bool:
    """n = 2^k * m for m = 1, m = q + 1 (q prime, 3 mod 4) or m = 2 (q + 1) (q prime, 1 mod 4)."""
    m = n
    while True:
        if m == 1 or (_prime(m - 1) and (m - 1) % 4 == 3):
            return True
        if m % 2 == 0 and _prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
            return True
        if m % 2:
            return False
        m //= 2


ORDERS = [n for n in range(1, 4097) if _documented_order(n)]


def _assert_hadamard_exactly(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    assert np.isin(h, (-1, 1)).all()
    hf = h.astype(np.float32)
    product = hf @ hf.T  # partial sums are integers of magnitude <= n < 2^24: exact
    np.testing.assert_array_equal(product, n * np.eye(n))


def _assert_hadamard_by_projection(n: int, rng: np.random.Generator) -> None:
    """H (H^T V) == n V exactly for 16 random 0/1 vectors V (Freivalds' check).

    If H H^T - n I != 0, a random 0/1 vector misses it with probability <= 1/2,
    so 16 vectors pass a wrong matrix with probability <= 2^-16. All values are
    integers below 2^24 in magnitude, so float32 is exact.
    """
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    assert np.isin(h, (-1, 1)).all()
    v = rng.integers(0, 2, size=(n, 16)).astype(np.float32)
    hf = h.astype(np.float32)
    np.testing.assert_array_equal(hf @ (hf.T @ v), n * v)


def test_supported_orders_are_exactly_the_documented_ones():
    assert {1, 2, 4, 12, 20, 28, 36, 44, 72, *WIDTHS} <= set(ORDERS)
    for n in range(1, 4097):
        if n in ORDERS:
            hadamard_signs(n, seed=0)  # accepts: checks the order without building H
        else:
            with pytest.raises(ValueError, match=f"no Hadamard matrix of order {n} "):
                hadamard_signs(n, seed=0)


@pytest.mark.parametrize("n", [n for n in ORDERS if n <= 256] + list(WIDTHS))
def test_hadamard_matrix_is_hadamard_exactly(n):
    _assert_hadamard_exactly(n)


def test_every_order_up_to_4096_is_hadamard():
    """Every documented order <= 1024 (191 of them); above, up to 4096, every order with
    odd part <= 15 (3072 = 2^10 * 3, 2560 = 2^9 * 5, ...) and a seeded sample of 24 of
    the other 459 (checking all 666 orders takes about a minute on two cores)."""
    rng = np.random.default_rng(0)
    above = [n for n in ORDERS if n > 1024]
    small_odd_part = [n for n in above if n // (n & -n) <= 15]
    rest = sorted(set(above) - set(small_odd_part))
    checked = [n for n in ORDERS if n <= 1024] + small_odd_part
    checked += [int(n) for n in rng.choice(rest, size=24, replace=False)]
    for n in checked:
        _assert_hadamard_by_projection(n, rng)


def test_small_known_matrices():
    np.testing.assert_array_equal(hadamard_matrix(1), [[1]])
    np.testing.assert_array_equal(hadamard_matrix(2), [[1, 1], [1, -1]])
    np.testing.assert_array_equal(
        hadamard_matrix(4), [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    )


def test_hadamard_matrix_is_cached_and_read_only():
    h = hadamard_matrix(384)
    assert hadamard_matrix(384) is h
    with pytest.raises(ValueError, match="read-only"):
        h[0, 0] = 0


@pytest.mark.parametrize("n", [0, -4, 4.0, True, "64", None])
def test_bad_orders_are_refused(n):
    with pytest.raises(ValueError, match="int >= 1"):
        hadamard_matrix(n)


def test_unsupported_order_names_the_form_and_the_nearest_orders():
    with pytest.raises(ValueError, match=r"no Hadamard matrix of order 52 .*2\^k \* m.* 48 and 56"):
        hadamard_matrix(52)
    with pytest.raises(ValueError, match="order 6 "):
        hadamard_matrix(6)


@pytest.mark.parametrize("n", [12, 28, 64, 384, 1536])
def test_random_hadamard_is_orthogonal(n):
    r = random_hadamard(n, seed=5)
    assert r.dtype == np.float64
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-6)
    d = hadamard_signs(n, seed=5)
    np.testing.assert_array_equal(
        r, d.astype(np.float64)[:, None] * hadamard_matrix(n) / math.sqrt(n)
    )
    np.testing.assert_array_equal(rotation_matrix(d), r)


def test_signs_are_seeded():
    a, b = hadamard_signs(384, seed=7), hadamard_signs(384, seed=7)
    assert a.dtype == np.float32 and a.shape == (384,)
    assert np.isin(a, (-1.0, 1.0)).all()
    np.testing.assert_array_equal(a, b)
    others = [hadamard_signs(384, seed=s) for s in range(8)]
    assert len({o.tobytes() for o in others}) == 8
    assert 0.3 < np.mean(a > 0) < 0.7
    with pytest.raises(ValueError, match="seed"):
        hadamard_signs(384, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        hadamard_signs(384, seed=1.5)


def _dense_rotation(n: int, signs: np.ndarray) -> np.ndarray:
    """R = diag(d) H / sqrt(n) in float64, written out."""
    return np.diag(signs.astype(np.float64)) @ hadamard_matrix(n).astype(np.float64) / np.sqrt(n)


@pytest.mark.parametrize("k", [64, 384, 1536])
def test_rotation_preserves_the_layer(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(6, k)).astype(np.float32)
    w = rng.normal(size=(k, 10)).astype(np.float32)
    signs = hadamard_signs(k, seed=1)
    r = _dense_rotation(k, signs)
    rotated = rotate(jnp.asarray(x), jnp.asarray(signs))
    assert rotated.dtype == jnp.float32 and rotated.shape == x.shape
    np.testing.assert_allclose(
        np.asarray(rotated), x.astype(np.float64) @ r, rtol=0, atol=2e-6 * k**0.5
    )
    rotated_w = rotate_weight(w, signs)
    assert rotated_w.dtype == np.float64
    np.testing.assert_allclose(rotated_w, r.T @ w.astype(np.float64), rtol=1e-12, atol=1e-12)
    y, expected = np.asarray(rotated, np.float64) @ rotated_w, x.astype(np.float64) @ w
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # In float32 throughout (rotated weight rounded to float32 too).
    y32 = np.asarray(rotated) @ rotated_w.astype(np.float32)
    np.testing.assert_allclose(y32, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_rotate_works_under_jit_with_traced_signs_and_keeps_the_dtype():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 3, 96)), jnp.float32)
    signs = jnp.asarray(hadamard_signs(96, seed=2))
    eager = rotate(x, signs)
    traced = jax.jit(rotate)(x, signs)
    closed = jax.jit(lambda v: rotate(v, signs))(x)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(closed), np.asarray(eager), rtol=1e-6, atol=1e-6)
    half = rotate(x.astype(jnp.bfloat16), signs)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(eager), atol=0.05)


@pytest.mark.parametrize("n", [64, 384, 1536])
def test_rotation_spreads_an_outlier(n):
    signs = hadamard_signs(n, seed=0)
    # Closed form: every basis vector e_i maps to a row of R, all |entries| 1 / sqrt(n).
    basis = np.eye(n, dtype=np.float32)[[0, n // 3, n - 1]]
    np.testing.assert_allclose(
        np.abs(np.asarray(rotate(basis, signs))), 1 / math.sqrt(n), rtol=1e-6
    )
    rng = np.random.default_rng(n)
    x = rng.normal(size=n).astype(np.float32)
    x[n // 2] = 1000.0

    def peak(v):
        return np.abs(v).max() / np.sqrt(np.mean(np.square(v)))

    assert peak(x) > 0.9 * math.sqrt(n)
    assert peak(np.asarray(rotate(x, signs))) < 1.5


def test_bad_signs_and_weights_are_refused():
    signs = hadamard_signs(64, seed=0)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="length 64"):
        rotate(x, signs[:32])
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        rotate(x, 0.5 * signs)
    with pytest.raises(ValueError, match="last axis"):
        rotate(np.float32(1.0), signs)
    with pytest.raises(ValueError, match="2-D"):
        rotate_weight(np.ones(64), signs)
    with pytest.raises(ValueError, match="length 64"):
        rotate_weight(np.ones((64, 3)), np.ones(12))
    with pytest.raises(ValueError, match="order 52"):
        rotate(np.ones((1, 52)), np.ones(52))
