"""Hypothesis properties of kdq.quant numerics on drawn shapes and specs.

Every example draws an array shape (rank 1 to 4, small sides), a spec that
fits it (bits, signed, symmetric, kept axes written as positive or negative
indices, a group size dividing the contraction axis, a calibration) and the
array itself; results are compared with the independent numpy reference in
`reference.py`. Elements are finite float32 with |x| <= 1e4 and no
subnormals. Each example compiles its own computations, so example counts
stay modest.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdq.quant import QuantSpec, calibrate, dequantize, fake_quant, quantize

from . import reference as ref

FLOATS = st.floats(
    min_value=-1e4,
    max_value=1e4,
    width=32,
    allow_nan=False,
    allow_infinity=False,
    allow_subnormal=False,
)
BITS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
PERCENTILES = (0.5, 10, 25, 30, 50, 62.5, 75, 90, 99, 99.9, 100)
CALIBRATIONS = ("absmax", "minmax", "mse", *(f"percentile,{p}" for p in PERCENTILES))
# The largest side per rank keeps every array at most 81 elements.
MAX_SIDE = {1: 12, 2: 6, 3: 4, 4: 3}

U = 2.0**-24  # float32 unit roundoff


def _settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None)


@st.composite
def shapes(draw) -> tuple[int, ...]:
    rank = draw(st.integers(1, 4))
    return tuple(draw(st.integers(1, MAX_SIDE[rank])) for _ in range(rank))


@st.composite
def specs_for(
    draw,
    shape: tuple[int, ...],
    *,
    calibrations: tuple[str, ...] = CALIBRATIONS,
    symmetric: bool | None = None,
    rounding: str = "nearest",
) -> QuantSpec:
    """A spec valid for `shape`: any kept axes, a group size dividing the grouped axis."""
    ndim = len(shape)
    signed = draw(st.booleans())
    symmetric = draw(st.booleans()) if symmetric is None else symmetric
    bits = draw(st.sampled_from(BITS[1:] if signed and symmetric else BITS))
    kept = sorted(draw(st.sets(st.integers(0, ndim - 1), max_size=ndim)))
    axes = draw(st.permutations([draw(st.sampled_from((a, a - ndim))) for a in kept]))
    reduced = [a for a in range(ndim) if a not in kept]
    group_size = None
    if reduced and draw(st.booleans()):
        n = shape[reduced[-1]]
        group_size = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    return QuantSpec(
        bits=bits,
        signed=signed,
        symmetric=symmetric,
        axes=tuple(axes),
        group_size=group_size,
        calibration=draw(st.sampled_from(calibrations)),
        rounding=rounding,
    )


@st.composite
def cases(draw, **spec_kwargs) -> tuple[np.ndarray, QuantSpec]:
    shape = draw(shapes())
    spec = draw(specs_for(shape, **spec_kwargs))
    return draw(hnp.arrays(np.float32, shape, elements=FLOATS)), spec


def _full(x, spec, scale, zero):
    """kdq's scale and zero point, broadcast per element (float64)."""
    _, gid = ref.groups(x.shape, spec.axes, spec.group_size)
    s = np.asarray(scale, np.float64).ravel()[gid]
    z = np.zeros(x.shape) if zero is None else np.asarray(zero, np.float64).ravel()[gid]
    return s, z


def _all_eager(x, spec):
    scale, zero = calibrate(x, spec)
    q = quantize(x, spec)
    return scale, zero, q.qvalue, q.scale, q.zero_point, dequantize(q), fake_quant(x, spec)


_all_jitted = jax.jit(_all_eager, static_argnames="spec")


def _assert_bitwise_equal(jitted, eager):
    for i, (a, b) in enumerate(zip(jitted, eager, strict=True)):
        name = f"output {i}"
        if a is None:
            assert b is None, name
        else:
            assert a.dtype == b.dtype, name
            np.testing.assert_array_equal(a, b, err_msg=name)


@_settings(60)
@given(case=cases(), index=st.integers(0, 10**6))
def test_quantize_matches_reference_and_jit(case, index):
    """Several properties on the same example:

    * calibration, integers, dequantized and fake-quantized values agree with
      the numpy reference (`reference.check_quantized`);
    * integers stay in [qmin, qmax]; inside the representable range the error
      is at most half a step; outside it the value saturates at the nearest end;
    * affine: an element equal to 0 comes back exactly 0, as the zero point;
    * eager and jitted calls give bitwise identical results.
    """
    x, spec = case
    zero_at = index % x.size
    if not spec.symmetric:
        x = x.copy()
        x.ravel()[zero_at] = 0.0
    jitted = jax.device_get(_all_jitted(x, spec))
    _assert_bitwise_equal(jitted, jax.device_get(_all_eager(x, spec)))
    cal_scale, cal_zero, qvalue, scale, zero, x_hat, fq = jitted
    np.testing.assert_array_equal(cal_scale, scale)
    ref.check_calibration(x, spec, cal_scale, cal_zero)
    ref.check_quantized(x, spec, scale, zero, qvalue, x_hat, fq)

    qmin, qmax = ref.int_range(spec.bits, spec.signed)
    q = qvalue.astype(np.int64)
    assert q.min() >= qmin and q.max() <= qmax
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    s, z = _full(x, spec, scale, zero)
    x64, x_hat64 = x.astype(np.float64), x_hat.astype(np.float64)
    inside = ((qmin - z) * s <= x64) & (x64 <= (qmax - z) * s)
    # Exactly, |x_hat - x| = s |round(x / s) - x / s| <= s / 2 inside the range. In
    # float32, x / s is computed as x * (1 / s) (relative error <= 2u, i.e. at most
    # 2u |x| after multiplying back by s) and (q - z) * s is rounded once (u |x_hat|):
    # 4u (|x| + |x_hat|) covers both with a factor-of-two margin.
    bound = s / 2 + 4 * U * (np.abs(x64) + np.abs(x_hat64))
    error = np.abs(x_hat64 - x64)
    assert np.all(error[inside] <= bound[inside]), (error - bound)[inside].max()
    assert np.all(q[x64 < (qmin - z) * s] == qmin)
    assert np.all(q[x64 > (qmax - z) * s] == qmax)
    if not spec.symmetric:
        assert x_hat.ravel()[zero_at] == 0.0 and fq.ravel()[zero_at] == 0.0
        _, gid = ref.groups(x.shape, spec.axes, spec.group_size)
        assert qvalue.ravel()[zero_at] == zero.ravel()[gid.ravel()[zero_at]]


@functools.partial(jax.jit, static_argnames="spec")
def _twice(x, spec):
    q1 = quantize(x, spec)
    fq1 = fake_quant(x, spec)
    q2 = quantize(fq1, spec)
    return q1.qvalue, q1.scale, fq1, q2.qvalue, q2.scale, fake_quant(fq1, spec)


@_settings(60)
@given(case=cases(calibrations=("absmax",), symmetric=True))
def test_fake_quant_is_idempotent_for_symmetric_absmax(case):
    """Re-quantizing fq(x) gives the same integers; the floats agree to the scale's ulp.

    In every scale group the element of largest magnitude M maps to +-qmax
    (or, unsigned, the largest positive one to qmax), so the second pass has
    bound qmax * s and scale (qmax * s) / qmax. In exact arithmetic that is s;
    in float32 (a product, then a quotient) it can be one ulp off, so exact
    equality of the floats does not hold in general. The integers do:
    q * s / s2 is within a few ulps of q (|q| <= 2^15), far from a midpoint.
    A group with no positive level in use (scale 1) stays at scale 1.
    """
    x, spec = case
    q1, s1, fq1, q2, s2, fq2 = jax.device_get(_twice(x, spec))
    np.testing.assert_array_equal(q2, q1)
    assert ref.within_ulps(s2, s1, ref.SCALE_ULPS).all(), (s1, s2)
    s2_full, _ = _full(x, spec, s2, None)
    np.testing.assert_array_equal(fq2, ref.dequantize_values(q1, s2_full.astype(np.float32), 0))
    s1_full, _ = _full(x, spec, s1, None)
    same = s1_full == s2_full
    np.testing.assert_array_equal(fq2[same], fq1[same])
    np.testing.assert_allclose(
        fq2[~same], fq1[~same], rtol=ref.SCALE_ULPS * 2.0**-23 + 2 * U, atol=0
    )


N_KEYS = 2048


@functools.partial(jax.jit, static_argnames="spec")
def _stochastic_samples(x, spec, key):
    keys = jax.random.split(key, N_KEYS)
    samples = jax.vmap(lambda k: dequantize(quantize(x, spec, key=k)))(keys)
    q = quantize(x, spec, key=key)
    return samples, q.scale, q.zero_point


@_settings(40)
@given(
    case=cases(calibrations=tuple(c for c in CALIBRATIONS if c != "mse"), rounding="stochastic"),
    seed=st.integers(0, 2**31 - 1),
)
def test_stochastic_rounding_is_unbiased(case, seed):
    """The mean of many stochastically rounded samples is x (inside the range), and
    every sample is a level next to x.

    The keys are "rbg" keys, which compile in half the time of the default
    threefry ones; the property holds for any source of uniform noise.
    (mse is left out: its calibration does not interact with the rounding, and
    the numerics tests cover it.)
    """
    x, spec = case
    key = jax.random.key(seed, impl="rbg")
    samples, scale, zero = jax.device_get(_stochastic_samples(x, spec, key))
    qmin, qmax = ref.int_range(spec.bits, spec.signed)
    s, z = _full(x, spec, scale, zero)
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
    # every sample is one of the two levels next to x, up to the rounding of t
    # (2u |t| steps of s) and of the product (q - z) * s (u |x|)
    near = np.abs(samples.astype(np.float64) - x64) <= s * (1 + 1e-5) + 4 * U * np.abs(x64)
    assert np.all(near[:, inside])


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((5,), QuantSpec(bits=8, rounding="stochastic")),
        ((3, 4), QuantSpec(bits=4, symmetric=False, axes=(-1,), rounding="stochastic")),
        (
            (2, 3, 4),
            QuantSpec(
                bits=3,
                signed=False,
                axes=(0,),
                group_size=2,
                calibration="minmax",
                rounding="stochastic",
            ),
        ),
        (
            (2, 2, 3, 2),
            QuantSpec(
                bits=16,
                symmetric=False,
                axes=(-1, 1),
                calibration="percentile,30",
                rounding="stochastic",
            ),
        ),
    ],
)
def test_stochastic_rounding_jit_equals_eager(shape, spec):
    """With the default (threefry) keys: one key gives bitwise the same integers and
    fake-quantized values eagerly and under jit."""
    x = (np.random.default_rng(len(shape)).standard_normal(shape) * 5).astype(np.float32)
    key = jax.random.key(7)

    def run(x, key):
        q = quantize(x, spec, key=key)
        return q.qvalue, q.scale, q.zero_point, fake_quant(x, spec, key=key)

    _assert_bitwise_equal(jax.device_get(jax.jit(run)(x, key)), jax.device_get(run(x, key)))


def test_jit_equals_no_jit_bfloat16_input():
    x = jnp.asarray(np.linspace(-3, 3, 24).reshape(4, 6), jnp.bfloat16)
    spec = QuantSpec(bits=4, axes=(-1,))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(fake_quant, static_argnames="spec")(x, spec), np.float32),
        np.asarray(fake_quant(x, spec), np.float32),
    )
