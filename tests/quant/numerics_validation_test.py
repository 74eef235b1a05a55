"""Given ranges and concrete values: what is rejected, and what traced values give.

A given scale must be a finite float32 >= 2^-126 and a given zero point an
integer in [qmin, qmax]. Concrete values that break this raise ValueError
before anything is compiled; traced ones (jit arguments) make the offending
groups NaN, never finite numbers. Arrays that are concrete inside a trace
(closed over by a jitted, vmapped or differentiated function) are checked
and quantized like eager ones.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import QuantSpec, calibrate, dequantize, fake_quant, quantize, scale_from_range

from . import reference as ref

X = np.array([[-2.0, -0.7, 0.0, 0.4], [1.3, 2.6, -1.1, 0.9], [3.3, -3.0, 0.2, -0.1]], np.float32)
SYMMETRIC = QuantSpec(bits=4, axes=(-1,))
AFFINE = QuantSpec(bits=8, signed=False, symmetric=False, axes=(-1,))
FUNCTIONS = {"quantize": quantize, "fake_quant": fake_quant}
SCALE_MESSAGE = r"scale must be finite and >= 1\.1754944e-38 \(the smallest normal float32\)"


def _expected_fq(x, scale, zero, spec):
    """Reference fake-quantization for a per-channel (last axis) given range."""
    q = ref.quantize_values(x, scale, zero, bits=spec.bits, signed=spec.signed)
    return ref.dequantize_values(q, scale, zero)


# ---------------------------------------------------------------- concrete: rejected


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (-0.5, "-0.5"),
        (np.nan, "nan"),
        (np.inf, "inf"),
        (-np.inf, "-inf"),
        (1e-39, "1e-39"),  # subnormal in float32
        (1e-50, "1e-50"),  # a positive float64 that is 0 in float32
    ],
)
def test_bad_given_scale_is_rejected(fn, bad, shown):
    for spec, zero in ((SYMMETRIC, None), (AFFINE, 3)):
        with pytest.raises(
            ValueError, match=SCALE_MESSAGE + r".*1 of 1, e\.g\. " + re.escape(shown)
        ):
            FUNCTIONS[fn](X, spec, scale=bad, zero_point=zero)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_one_bad_channel_scale_is_rejected(fn):
    scale = np.array([0.5, 0.25, -0.25, 0.1], np.float32)
    with pytest.raises(ValueError, match=SCALE_MESSAGE + r".*1 of 4, e\.g\. -0\.25"):
        FUNCTIONS[fn](X, SYMMETRIC, scale=scale)
    with pytest.raises(ValueError, match=SCALE_MESSAGE + r".*2 of 4"):
        FUNCTIONS[fn](X, SYMMETRIC, scale=np.array([0.5, 0.0, np.nan, 1.0], np.float32))


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_given_scale_that_is_not_a_number_is_rejected(fn):
    with pytest.raises(ValueError, match=r"scale must be a float or float array, got scale='0\.1'"):
        FUNCTIONS[fn](X, SYMMETRIC, scale="0.1")


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize(
    ("spec", "zero", "pattern"),
    [
        (AFFINE, 256, r"\[qmin, qmax\] = \[0, 255\] for bits=8, signed=False.*e\.g\. 256.*uint8"),
        (AFFINE, -1, r"\[qmin, qmax\] = \[0, 255\].*e\.g\. -1"),
        (AFFINE, np.array([3, 300, 4, 5]), r"\[0, 255\].*1 of 4, e\.g\. 300"),
        (
            QuantSpec(bits=4, symmetric=False, axes=(-1,)),
            8,
            r"\[qmin, qmax\] = \[-8, 7\] for bits=4, signed=True.*e\.g\. 8.*int4",
        ),
        (QuantSpec(bits=4, symmetric=False), -9, r"\[-8, 7\].*e\.g\. -9"),
        (AFFINE, 2.5, r"zero_point must hold integers.*e\.g\. 2\.5"),
        (AFFINE, np.nan, r"zero_point must hold integers.*e\.g\. nan"),
        (AFFINE, np.inf, r"\[0, 255\].*e\.g\. inf"),
        (AFFINE, "3", r"zero_point must be an integer array, got zero_point='3'"),
        (
            AFFINE,
            np.array([1, 2]),
            r"zero_point of shape \(2,\) does not broadcast to the scale.s shape \(1, 1\)",
        ),
    ],
)
def test_bad_given_zero_point_is_rejected(fn, spec, zero, pattern):
    """Out-of-range zero points used to wrap silently through the storage dtype."""
    with pytest.raises(ValueError, match=pattern):
        FUNCTIONS[fn](X, spec, scale=0.05, zero_point=zero)


def test_validation_happens_before_the_jitted_core():
    """A rejected range never reaches (or compiles) the jitted computation."""
    from kdq.quant import numerics

    cores = (numerics._quantize, numerics._fake_quant)
    before = [core._cache_size() for core in cores]
    x = np.ones((7, 5), np.float32)  # a shape no other test uses
    for fn in FUNCTIONS.values():
        with pytest.raises(ValueError, match=SCALE_MESSAGE):
            fn(x, SYMMETRIC, scale=0.0)
        with pytest.raises(ValueError, match=r"zero_point must lie in"):
            fn(x, AFFINE, scale=0.1, zero_point=-3)
    assert [core._cache_size() for core in cores] == before


# ----------------------------------------------------------------- concrete: accepted


def test_extreme_valid_given_ranges_are_accepted():
    tiny = np.finfo(np.float32).tiny
    fq = fake_quant(X, SYMMETRIC, scale=tiny)
    np.testing.assert_array_equal(np.asarray(fq), _expected_fq(X, np.float32(tiny), 0, SYMMETRIC))
    for zero in (0, 255, np.uint8(255), 7.0, np.array([0, 255, 7, 128], np.int32)):
        q = quantize(X, AFFINE, scale=np.full(4, 0.05, np.float32), zero_point=zero)
        expected_zero = np.broadcast_to(np.asarray(zero, np.float32), (1, 4))
        np.testing.assert_array_equal(np.asarray(q.zero_point, np.float32), expected_zero)
        np.testing.assert_array_equal(
            np.asarray(q.qvalue, np.int64),
            ref.quantize_values(X, np.float32(0.05), expected_zero, bits=8, signed=False),
        )
    # a QArray's own (int4) zero point round-trips as a given one
    spec = QuantSpec(bits=4, symmetric=False, axes=(-1,), calibration="minmax")
    q = quantize(X, spec)
    again = quantize(X, spec, scale=q.scale, zero_point=q.zero_point)
    np.testing.assert_array_equal(np.asarray(again.qvalue), np.asarray(q.qvalue))


# -------------------------------------------------------------------- traced: NaN out


@jax.jit
def _traced_symmetric(x, scale):
    q = quantize(x, SYMMETRIC, scale=scale)
    return q.scale, dequantize(q), fake_quant(x, SYMMETRIC, scale=scale)


@jax.jit
def _traced_affine(x, scale, zero):
    q = quantize(x, AFFINE, scale=scale, zero_point=zero)
    return q.scale, q.zero_point, dequantize(q), fake_quant(x, AFFINE, scale=scale, zero_point=zero)


@pytest.mark.parametrize("bad", [0.0, -0.25, np.nan, np.inf, -np.inf, 1e-39])
def test_traced_bad_scale_gives_nan_in_its_channel_only(bad):
    """Under jit a 0 scale used to give 0 everywhere, a negative one a mirrored grid."""
    scale = np.array([0.5, bad, 0.25, 0.1], np.float32)
    q_scale, x_hat, fq = jax.device_get(_traced_symmetric(X, scale))
    assert np.isnan(q_scale[0, 1])
    assert np.isnan(x_hat[:, 1]).all() and np.isnan(fq[:, 1]).all()
    good = [0, 2, 3]
    expected = _expected_fq(X[:, good], scale[good], 0, SYMMETRIC)
    np.testing.assert_array_equal(x_hat[:, good], expected)
    np.testing.assert_array_equal(fq[:, good], expected)


@pytest.mark.parametrize("bad_zero", [256, -1, 2.5, np.nan, 1000])
def test_traced_bad_zero_point_gives_nan_in_its_channel_only(bad_zero):
    """Under jit an out-of-range zero point used to wrap (256 -> 0) and give finite values."""
    scale = np.array([0.05, 0.02, 0.1, 0.03], np.float32)
    zero = np.array([3.0, bad_zero, 128.0, 255.0], np.float32)
    q_scale, q_zero, x_hat, fq = jax.device_get(_traced_affine(X, scale, zero))
    assert np.isnan(q_scale[0, 1]) and q_zero[0, 1] == 0 and q_zero.dtype == np.uint8
    assert np.isnan(x_hat[:, 1]).all() and np.isnan(fq[:, 1]).all()
    good = [0, 2, 3]
    expected = _expected_fq(X[:, good], scale[good], zero[good], AFFINE)
    np.testing.assert_array_equal(q_zero[0, good], zero[good])
    np.testing.assert_array_equal(x_hat[:, good], expected)
    np.testing.assert_array_equal(fq[:, good], expected)


def test_traced_valid_range_equals_eager_bitwise():
    scale = np.array([0.05, 0.02, 0.1, 0.03], np.float32)
    zero = np.array([3, 7, 128, 255], np.uint8)
    q_scale, q_zero, x_hat, fq = jax.device_get(_traced_affine(X, scale, zero))
    q = quantize(X, AFFINE, scale=scale, zero_point=zero)
    np.testing.assert_array_equal(q_scale, np.asarray(q.scale))
    np.testing.assert_array_equal(q_zero, np.asarray(q.zero_point))
    np.testing.assert_array_equal(x_hat, np.asarray(dequantize(q)))
    np.testing.assert_array_equal(
        fq, np.asarray(fake_quant(X, AFFINE, scale=scale, zero_point=zero))
    )


# ---------------------------------------------------------------------- scale_from_range


@pytest.mark.parametrize(
    ("lo", "hi", "bad"),
    [(np.nan, 1.0, "lo"), (-1.0, np.nan, "hi"), (-np.inf, 1.0, "lo"), (-1.0, np.inf, "hi")],
)
def test_scale_from_range_rejects_non_finite_bounds(lo, hi, bad):
    affine = QuantSpec(bits=8, symmetric=False)
    with pytest.raises(ValueError, match=rf"{bad} must be finite \(in float32\)"):
        scale_from_range(lo, hi, affine)
    if bad == "hi":
        with pytest.raises(ValueError, match=r"hi must be finite"):
            scale_from_range(lo, hi, QuantSpec(bits=8))
    with pytest.raises(ValueError, match=r"lo must be finite.*1 of 2, e\.g\. nan"):
        scale_from_range(np.array([-1.0, np.nan]), np.array([1.0, 2.0]), affine)


def test_scale_from_range_symmetric_ignores_lo():
    scale, zero = scale_from_range(np.nan, 2.54, QuantSpec(bits=8))
    assert zero is None
    assert float(scale) == float(np.float32(2.54) / np.float32(127))


def test_scale_from_range_matches_closed_form_and_traced_nan():
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    lo = np.array([-1.0, 0.5, -3.0], np.float32)
    hi = np.array([3.0, 2.0, -1.0], np.float32)
    scale, zero = scale_from_range(lo, hi, spec)
    for i in range(3):
        s_ref, z_ref = ref.scale_and_zero(
            min(lo[i], np.float32(0)),
            max(hi[i], np.float32(0)),
            bits=4,
            signed=False,
            symmetric=False,
        )
        # XLA divides by a broadcast operand through its reciprocal: 2 ulp (reference.py)
        assert ref.within_ulps(scale[i], s_ref, ref.SCALE_ULPS) and int(zero[i]) == int(z_ref)
    jitted = jax.jit(lambda a, b: scale_from_range(a, b, spec))
    j_scale, j_zero = jitted(lo, hi)
    np.testing.assert_array_equal(np.asarray(j_scale), np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(j_zero), np.asarray(zero))
    nan_scale, _ = jitted(
        np.array([np.nan, -1.0, -1.0], np.float32), np.array([1.0, np.inf, 1.0], np.float32)
    )
    assert np.isnan(np.asarray(nan_scale)[:2]).all() and np.isfinite(np.asarray(nan_scale)[2])


# ----------------------------------------------- arrays concrete inside a trace (closed over)


SPECS = (
    QuantSpec(bits=8),
    QuantSpec(bits=4, symmetric=False, axes=(-1,), calibration="minmax"),
    QuantSpec(bits=3, signed=False, axes=(0,), group_size=2, calibration="percentile,90"),
)


def _all(x, spec):
    scale, zero = calibrate(x, spec)
    q = quantize(x, spec)
    return scale, zero, q.qvalue, dequantize(q), fake_quant(x, spec)


def _assert_tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_issue_example_closed_over_array_under_jit():
    x = jnp.ones((4, 4))
    out = jax.jit(lambda s: fake_quant(x, QuantSpec(bits=8)) * s)(1.0)
    np.testing.assert_array_equal(np.asarray(out), np.ones((4, 4), np.float32))


@pytest.mark.parametrize("spec", SPECS, ids=["absmax", "affine-minmax", "grouped-percentile"])
@pytest.mark.parametrize("closed", ["jax", "numpy"])
def test_closed_over_arrays_under_jit_vmap_and_grad(spec, closed):
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 6)).astype(np.float32) * 3)
    if closed == "numpy":
        x = np.asarray(x)
    eager = _all(x, spec)
    _assert_tree_equal(jax.jit(lambda s: _all(x, spec))(1.0), eager)
    batched = jax.vmap(lambda s: _all(x, spec)[-1] * s)(jnp.array([1.0, 2.0]))
    np.testing.assert_array_equal(np.asarray(batched[1]), 2 * np.asarray(eager[-1]))

    # d/ds (fq(x)[1, 2] * s) = fq(x)[1, 2], with x closed over
    def f(s):
        return fake_quant(x, spec)[1, 2] * s

    assert float(jax.grad(f)(1.0)) == float(eager[-1][1, 2])
    assert float(jax.jit(jax.grad(f))(1.0)) == float(eager[-1][1, 2])


def test_closed_over_tracer_of_an_outer_trace():
    """An outer jit's traced value closed over by an inner jit: unchecked, and correct."""
    x = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)
    spec = SPECS[1]

    @jax.jit
    def outer(y):
        return jax.jit(lambda s: fake_quant(y, spec) * s)(1.0)

    np.testing.assert_array_equal(np.asarray(outer(x)), np.asarray(fake_quant(x, spec)))


@pytest.mark.parametrize("transform", ["jit", "vmap", "grad"])
def test_closed_over_non_finite_array_is_rejected_under_transformations(transform):
    x = jnp.array([[1.0, np.nan], [2.0, 3.0]])

    def f(s):
        return jnp.sum(fake_quant(x, QuantSpec(bits=8)) * s)

    run = {"jit": jax.jit(f), "vmap": jax.vmap(f), "grad": jax.grad(f)}[transform]
    with pytest.raises(ValueError, match=r"x contains 1 non-finite value\(s\)"):
        run(jnp.ones((2,)) if transform == "vmap" else 1.0)


def test_closed_over_bad_scale_is_rejected_under_jit():
    scale = jnp.array([0.5, 0.0, 0.25, 0.1])
    with pytest.raises(ValueError, match=SCALE_MESSAGE):
        jax.jit(lambda x: fake_quant(x, SYMMETRIC, scale=scale))(X)
    zero = jnp.array([3, 256, 4, 5])
    with pytest.raises(ValueError, match=r"zero_point must lie in \[qmin, qmax\] = \[0, 255\]"):
        jax.jit(lambda x: quantize(x, AFFINE, scale=0.1, zero_point=zero))(X)
