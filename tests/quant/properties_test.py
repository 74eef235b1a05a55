"""Hypothesis properties of kdq.quant numerics.

Every property draws a spec from a fixed list and arrays of one fixed shape, so
each jitted function compiles once per spec and is reused across examples.
Elements are finite float32 with |x| <= 1e4 and no subnormals.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdq.quant import QuantSpec, calibrate, dequantize, fake_quant, quantize

from . import reference as ref

SHAPE = (4, 6)
FLOATS = st.floats(
    min_value=-1e4,
    max_value=1e4,
    width=32,
    allow_nan=False,
    allow_infinity=False,
    allow_subnormal=False,
)
ARRAYS = hnp.arrays(np.float32, SHAPE, elements=FLOATS)
PROPERTY = settings(max_examples=200, deadline=None)

SPECS = (
    QuantSpec(bits=8),
    QuantSpec(bits=4, axes=(-1,)),
    QuantSpec(bits=3, signed=False, axes=(0,), calibration="minmax"),
    QuantSpec(bits=8, symmetric=False, calibration="minmax"),
    QuantSpec(bits=1, symmetric=False, axes=(-1,), calibration="absmax"),
    QuantSpec(
        bits=4,
        signed=False,
        symmetric=False,
        axes=(-1,),
        group_size=2,
        calibration="percentile,90",
    ),
    QuantSpec(bits=5, symmetric=False, axes=(0,), calibration="percentile,30"),
    QuantSpec(bits=6, group_size=3, calibration="percentile,99"),
    QuantSpec(bits=2, symmetric=False, axes=(0,), calibration="mse"),
    QuantSpec(bits=16, symmetric=False, signed=False, axes=(-1,), calibration="absmax"),
)
AFFINE_SPECS = tuple(s for s in SPECS if not s.symmetric)
PER_TENSOR_ABSMAX = tuple(
    QuantSpec(bits=bits, signed=signed)
    for bits, signed in ((2, True), (8, True), (16, True), (1, False), (8, False))
)

U = 2.0**-24  # float32 unit roundoff


@functools.partial(jax.jit, static_argnames="spec")
def _roundtrip(x, spec):
    q = quantize(x, spec)
    return q.qvalue, q.scale, q.zero_point, dequantize(q), fake_quant(x, spec)


def _full(spec, scale, zero):
    """kdq's scale and zero point, broadcast per element (float64)."""
    _, gid = ref.groups(SHAPE, spec.axes, spec.group_size)
    s = np.asarray(scale, np.float64).ravel()[gid]
    z = np.zeros(SHAPE) if zero is None else np.asarray(zero, np.float64).ravel()[gid]
    return s, z


@PROPERTY
@given(x=ARRAYS, spec=st.sampled_from(SPECS))
def test_reconstruction_error_and_integer_range(x, spec):
    """Two properties on the same examples: integers stay in [qmin, qmax], and inside
    the representable range the error is at most half a step."""
    qvalue, scale, zero, x_hat, fq = jax.device_get(_roundtrip(x, spec))
    qmin, qmax = ref.int_range(spec.bits, spec.signed)
    assert qvalue.dtype.name == ref.storage_dtype_name(spec.bits, spec.signed)
    q = qvalue.astype(np.int64)
    assert q.min() >= qmin and q.max() <= qmax
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    s, z = _full(spec, scale, zero)
    x64, x_hat64 = x.astype(np.float64), x_hat.astype(np.float64)
    inside = ((qmin - z) * s <= x64) & (x64 <= (qmax - z) * s)
    # Exactly, |x_hat - x| = s |round(x / s) - x / s| <= s / 2 inside the range. In
    # float32, x / s is computed as x * (1 / s) (relative error <= 2u, i.e. at most
    # 2u |x| after multiplying back by s) and (q - z) * s is rounded once (u |x_hat|):
    # 4u (|x| + |x_hat|) covers both with a factor-of-two margin.
    bound = s / 2 + 4 * U * (np.abs(x64) + np.abs(x_hat64))
    error = np.abs(x_hat64 - x64)
    assert np.all(error[inside] <= bound[inside]), (error - bound)[inside].max()
    # outside the range the value saturates at the nearest end
    assert np.all(q[x64 < (qmin - z) * s] == qmin)
    assert np.all(q[x64 > (qmax - z) * s] == qmax)
    np.testing.assert_array_equal(fq, x_hat)


@functools.partial(jax.jit, static_argnames="spec")
def _twice(x, spec):
    q1 = quantize(x, spec)
    fq1 = fake_quant(x, spec)
    q2 = quantize(fq1, spec)
    return q1.qvalue, q1.scale, fq1, q2.qvalue, q2.scale, fake_quant(fq1, spec)


@PROPERTY
@given(x=ARRAYS, spec=st.sampled_from(PER_TENSOR_ABSMAX))
def test_fake_quant_is_idempotent_per_tensor_absmax(x, spec):
    """Re-quantizing fq(x) gives the same integers; the floats agree to the scale's ulp.

    The element of largest magnitude M maps to +-qmax, so the second pass has
    bound qmax * s and scale (qmax * s) / qmax. In exact arithmetic that is s; in
    float32 (a product, then XLA's multiplication by 1 / qmax) it can be one ulp
    off, so exact equality of the floats does not hold in general. The integers
    do: q * s / s2 is within a few ulps of q (|q| <= 2^15), far from a midpoint.
    """
    q1, s1, fq1, q2, s2, fq2 = jax.device_get(_twice(x, spec))
    np.testing.assert_array_equal(q2, q1)
    assert ref.within_ulps(s2, s1, ref.SCALE_ULPS).all(), (s1, s2)
    np.testing.assert_array_equal(fq2, ref.dequantize_values(q1, s2, 0))
    if np.array_equal(s1, s2):
        np.testing.assert_array_equal(fq2, fq1)
    else:
        np.testing.assert_allclose(fq2, fq1, rtol=ref.SCALE_ULPS * 2.0**-23 + 2 * U, atol=0)


@PROPERTY
@given(x=ARRAYS, spec=st.sampled_from(AFFINE_SPECS), index=st.integers(0, math.prod(SHAPE) - 1))
def test_affine_represents_zero_exactly(x, spec, index):
    x = x.copy()
    x.ravel()[index] = 0.0
    qvalue, _, zero, x_hat, fq = jax.device_get(_roundtrip(x, spec))
    assert x_hat.ravel()[index] == 0.0
    assert fq.ravel()[index] == 0.0
    # and 0 quantizes to the zero point itself
    _, gid = ref.groups(SHAPE, spec.axes, spec.group_size)
    assert qvalue.ravel()[index] == np.asarray(zero).ravel()[gid.ravel()[index]]


STOCHASTIC_SPECS = (
    QuantSpec(bits=8, rounding="stochastic"),
    QuantSpec(bits=4, symmetric=False, axes=(-1,), rounding="stochastic"),
    QuantSpec(bits=3, signed=False, axes=(0,), calibration="minmax", rounding="stochastic"),
)
N_KEYS = 2048


@functools.partial(jax.jit, static_argnames="spec")
def _stochastic_samples(x, spec, key):
    keys = jax.random.split(key, N_KEYS)
    samples = jax.vmap(lambda k: dequantize(quantize(x, spec, key=k)))(keys)
    q = quantize(x, spec, key=key)
    return samples, q.scale, q.zero_point


@PROPERTY
@given(x=ARRAYS, spec=st.sampled_from(STOCHASTIC_SPECS), seed=st.integers(0, 2**31 - 1))
def test_stochastic_rounding_is_unbiased(x, spec, seed):
    samples, scale, zero = jax.device_get(_stochastic_samples(x, spec, jax.random.key(seed)))
    qmin, qmax = ref.int_range(spec.bits, spec.signed)
    s, z = _full(spec, scale, zero)
    x64 = x.astype(np.float64)
    t = x64 / s
    inside = (qmin - z <= t) & (t <= qmax - z)
    # floor(t + u), u ~ U[0, 1), is t's floor plus a Bernoulli(frac(t)) step: the
    # mean of K samples has variance s^2 f (1 - f) / K. Bernstein's inequality
    # gives a deviation bound for it with failure probability 1e-7 per element
    # (about 6 standard errors at f = 1/2, and still valid when f is near 0 or 1
    # where a normal approximation is not).
    f = t - np.floor(t)
    var = f * (1 - f)
    log_term = math.log(2 / 1e-7)
    bound = (log_term / 3 + np.sqrt(log_term**2 / 9 + 2 * N_KEYS * var * log_term)) / N_KEYS
    # float32 noise: t = x * (1 / s) is off by <= 2u |t|; t + u is rounded (an ulp
    # of |t| + 1); (q - z) * s is rounded (u |x|)
    float_bias = 4 * U * (np.abs(t) + 2) + U * np.abs(x64) / s
    deviation = np.abs(samples.astype(np.float64).mean(axis=0) - x64) / s
    assert np.all(deviation[inside] <= (bound + float_bias)[inside]), (
        deviation - bound - float_bias
    )[inside].max()
    # every sample is one of the two levels next to x
    near = np.abs(samples.astype(np.float64) - x64) <= s * (1 + 1e-5)
    assert np.all(near[:, inside])


JIT_SPECS = (SPECS[0], SPECS[2], SPECS[3], SPECS[5], SPECS[7], STOCHASTIC_SPECS[1])


@functools.partial(jax.jit, static_argnames="spec")
def _all_jitted(x, spec, key):
    scale, zero = calibrate(x, spec)
    q = quantize(x, spec, key=key)
    return scale, zero, q.qvalue, q.scale, dequantize(q), fake_quant(x, spec, key=key)


def _all_eager(x, spec, key):
    scale, zero = calibrate(x, spec)
    q = quantize(x, spec, key=key)
    return scale, zero, q.qvalue, q.scale, dequantize(q), fake_quant(x, spec, key=key)


@PROPERTY
@given(x=ARRAYS, spec=st.sampled_from(JIT_SPECS), seed=st.integers(0, 2**31 - 1))
def test_jit_equals_no_jit(x, spec, seed):
    key = jax.random.key(seed) if spec.rounding == "stochastic" else None
    jitted = jax.device_get(_all_jitted(x, spec, key))
    eager = jax.device_get(_all_eager(x, spec, key))
    for name, a, b in zip(
        ("scale", "zero", "qvalue", "q.scale", "dequantize", "fake_quant"),
        jitted,
        eager,
        strict=True,
    ):
        if a is None:
            assert b is None, name
        else:
            assert a.dtype == b.dtype, name
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_jit_equals_no_jit_mse():
    """mse in eager mode is slow (a scan per call): a few fixed inputs instead."""
    rng = np.random.default_rng(0)
    spec = next(s for s in SPECS if s.calibration == "mse")
    for x in (
        rng.standard_normal(SHAPE).astype(np.float32),
        (rng.standard_t(2, SHAPE) * 100).astype(np.float32),
        np.zeros(SHAPE, np.float32),
    ):
        jitted = jax.device_get(_all_jitted(x, spec, None))
        eager = jax.device_get(_all_eager(x, spec, None))
        for a, b in zip(jitted, eager, strict=True):
            np.testing.assert_array_equal(a, b)


def test_jit_equals_no_jit_bfloat16_input():
    x = jnp.asarray(np.linspace(-3, 3, 24).reshape(SHAPE), jnp.bfloat16)
    spec = QuantSpec(bits=4, axes=(-1,))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(fake_quant, static_argnames="spec")(x, spec), np.float32),
        np.asarray(fake_quant(x, spec), np.float32),
    )
