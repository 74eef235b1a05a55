"""kdq.quant numerics against the independent numpy reference in `reference.py`.

The main matrix runs every integer format (bits 1..8 and 16, signed or not,
symmetric or affine) on every layout (per-tensor, per-channel on the last and
the first axis, a 4-D conv kernel, per-group). Calibrations rotate over the
matrix so that each calibration meets every (bits, signed, symmetric) format on
some layout and every (bits, layout) pair in some format. All kdq calls are
jitted.

Scales are compared to 2 ulp and integers exactly, except where x / s lies
within 2^-20 (relative) of a rounding midpoint: under jit, XLA evaluates a
division by a broadcast or constant operand as a multiplication by its
reciprocal, which is not the correctly rounded quotient (see reference.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import QuantSpec, calibrate, dequantize, fake_quant, quantize, scale_shape

from . import reference as ref

BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
CALIBRATIONS = ("absmax", "minmax", "percentile,75", "mse")
# name: (shape, axes, group_size). Group sizes n satisfy 4 | n - 1, so the 25th
# and 75th percentiles are order statistics (no interpolation) and the reference
# scale is exact.
LAYOUTS = {
    "per_tensor": ((5, 9), (), None),
    "per_channel_last": ((9, 6), (-1,), None),
    "per_channel_first": ((6, 13), (0,), None),
    "conv_kernel": ((3, 3, 5, 4), (-1,), None),
    "per_group": ((10, 4), (-1,), 5),
}


def _matrix():
    cases = []
    for li, layout in enumerate(LAYOUTS):
        for bi, bits in enumerate(BITS):
            for signed in (True, False):
                for symmetric in (True, False):
                    if bits == 1 and signed and symmetric:
                        continue  # forbidden: see test_signed_symmetric_one_bit_is_rejected
                    calibration = CALIBRATIONS[(bi + li + signed + 2 * symmetric) % 4]
                    cases.append((layout, bits, signed, symmetric, calibration))
    return cases


MATRIX = _matrix()


def _spec(layout, bits, signed, symmetric, calibration):
    _, axes, group_size = LAYOUTS[layout]
    return QuantSpec(
        bits=bits,
        signed=signed,
        symmetric=symmetric,
        axes=axes,
        group_size=group_size,
        calibration=calibration,
    )


@functools.cache
def layout_data(layout: str) -> np.ndarray:
    """Deterministic data: per scale group a random spread and a sign bias, some zeros."""
    shape, axes, group_size = LAYOUTS[layout]
    rng = np.random.default_rng(list(LAYOUTS).index(layout) + 100)
    _, gid = ref.groups(shape, axes, group_size)
    n = gid.max() + 1
    spread = rng.uniform(0.05, 20.0, size=n)
    # group g: mixed signs (g % 3 == 0), mostly positive (1), mostly negative (2)
    bias = np.array([0.0, 2.5, -2.5])[np.arange(n) % 3] * spread
    x = rng.standard_normal(shape) * spread[gid] + bias[gid]
    x.ravel()[::7] = 0.0
    return x.astype(np.float32)


@functools.partial(jax.jit, static_argnames="specs")
def _run_specs(x, specs):
    out = []
    for spec in specs:
        cal_scale, cal_zero = calibrate(x, spec)
        q = quantize(x, spec)
        out.append((cal_scale, cal_zero, q, dequantize(q), fake_quant(x, spec)))
    return out


@pytest.mark.parametrize("calibration", CALIBRATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_jitted_kdq_matches_reference(layout, calibration):
    """Every format of the matrix with this layout and calibration (one jit for all)."""
    cases = [case for case in MATRIX if case[0] == layout and case[4] == calibration]
    specs = tuple(_spec(*case) for case in cases)
    x = layout_data(layout)
    outputs = jax.device_get(_run_specs(x, specs))
    failures = []
    for spec, (cal_scale, cal_zero, q, x_hat, fq) in zip(specs, outputs, strict=True):
        try:
            ref.check_calibration(x, spec, cal_scale, cal_zero)
            ref.check_quantized(x, spec, q.scale, q.zero_point, q.qvalue, x_hat, fq)
            assert q.spec == spec
        except AssertionError as e:
            failures.append(f"{spec}:\n{e}")
    assert not failures, f"{len(failures)}/{len(specs)} specs differ:\n\n" + "\n\n".join(failures)
    assert len(specs) >= 8


def test_group_without_kept_axis_matches_reference():
    x = np.random.default_rng(2).standard_normal((5, 10)).astype(np.float32) * 4
    x[:, 5:] += 3.0
    specs = (
        QuantSpec(bits=4, group_size=5),
        QuantSpec(bits=3, signed=False, symmetric=False, group_size=5, calibration="minmax"),
        QuantSpec(bits=16, symmetric=False, group_size=5, calibration="percentile,75"),
    )
    outputs = jax.device_get(_run_specs(x, specs))
    for spec, (cal_scale, cal_zero, q, x_hat, fq) in zip(specs, outputs, strict=True):
        assert np.asarray(q.scale).shape == (1, 2)
        ref.check_calibration(x, spec, cal_scale, cal_zero)
        ref.check_quantized(x, spec, q.scale, q.zero_point, q.qvalue, x_hat, fq)


def test_matrix_covers_every_calibration_with_every_format_and_layout():
    seen_format = {(b, s, y, c) for _, b, s, y, c in MATRIX}
    seen_layout = {(layout, b, c) for layout, b, _, _, c in MATRIX}
    for bits in BITS:
        for signed in (True, False):
            for symmetric in (True, False):
                if bits == 1 and signed and symmetric:
                    continue
                for calibration in CALIBRATIONS:
                    assert (bits, signed, symmetric, calibration) in seen_format
    for layout in LAYOUTS:
        for bits in BITS[1:]:  # one bit has only three formats, so three calibrations
            for calibration in CALIBRATIONS:
                assert (layout, bits, calibration) in seen_layout
    assert len(MATRIX) == len(LAYOUTS) * (len(BITS) * 4 - 1)


def test_signed_symmetric_one_bit_is_rejected():
    with pytest.raises(ValueError, match=r"bits=1 with signed=True, symmetric=True"):
        QuantSpec(bits=1, signed=True, symmetric=True)
    # the other one-bit formats exist
    assert (QuantSpec(bits=1, signed=False).qmin, QuantSpec(bits=1, signed=False).qmax) == (0, 1)
    affine = QuantSpec(bits=1, symmetric=False)
    assert (affine.qmin, affine.qmax) == (-1, 0)


@pytest.mark.parametrize(
    ("shape", "axes", "group_size", "expected"),
    [
        ((5, 9), (), None, (1, 1)),
        ((9, 6), (-1,), None, (1, 6)),
        ((6, 13), (0,), None, (6, 1)),
        ((3, 3, 5, 4), (-1,), None, (1, 1, 1, 4)),
        ((3, 3, 5, 4), (-1,), 5, (1, 1, 1, 4)),
        ((3, 3, 10, 4), (-1,), 5, (1, 1, 2, 4)),
        ((10, 4), (-1,), 5, (2, 4)),
        ((5, 10), (), 5, (1, 2)),
        ((8, 6), (0, 1), None, (8, 6)),
        ((7,), (), 7, (1,)),
    ],
)
def test_scale_shape(shape, axes, group_size, expected):
    spec = QuantSpec(axes=axes, group_size=group_size)
    assert scale_shape(shape, spec) == expected
    assert ref.groups(shape, axes, group_size)[0] == expected


def test_round_half_to_even_with_given_scale():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, 127.5], np.float32)
    quant = jax.jit(quantize, static_argnames="spec")
    q = quant(x, QuantSpec(bits=8), scale=1.0)
    np.testing.assert_array_equal(np.asarray(q.qvalue), [0, 2, 2, 0, -2, -2, 4, 126, 127])
    # scale 0.5 is a power of two: x / s is exact, so these are exact ties too
    q = quant(x / 2, QuantSpec(bits=8), scale=0.5)
    np.testing.assert_array_equal(np.asarray(q.qvalue), [0, 2, 2, 0, -2, -2, 4, 126, 127])
    q = quant(x, QuantSpec(bits=8, symmetric=False, signed=False), scale=1.0, zero_point=3)
    np.testing.assert_array_equal(np.asarray(q.qvalue), [3, 5, 5, 3, 1, 1, 7, 129, 131])


def test_hand_computed_affine_example():
    # [lo, hi] = [-1, 3]; 8-bit unsigned: s = 4/255, z = 0 - round(-1 / s) = round(63.75) = 64
    x = np.array([-1.0, 0.0, 1.0, 3.0], np.float32)
    spec = QuantSpec(bits=8, signed=False, symmetric=False, calibration="minmax")
    q = jax.jit(quantize, static_argnames="spec")(x, spec)
    s = np.float32(4) / np.float32(255)
    assert abs(float(q.scale[0]) - float(s)) <= ref.SCALE_ULPS * float(np.spacing(s))
    assert int(q.zero_point[0]) == 64
    np.testing.assert_array_equal(np.asarray(q.qvalue), [0, 64, 128, 255])
    assert float(dequantize(q)[1]) == 0.0


@pytest.mark.parametrize(
    ("shape", "axes", "group_size", "calibration"),
    [
        ((6, 40), (0,), None, "percentile,99.9"),
        ((6, 40), (0,), None, "percentile,33.3"),
        ((12, 5), (-1,), 4, "percentile,90"),
        ((7, 11), (), None, "percentile,0.5"),
    ],
)
def test_interpolated_percentile(shape, axes, group_size, calibration):
    """Percentiles between order statistics: numpy and jax interpolate in a different
    order, so scales agree to the bound derived in `reference._percentile_tolerance`."""
    rng = np.random.default_rng(7)
    x = (rng.standard_t(3, size=shape) * 2 + 0.3).astype(np.float32)
    specs = tuple(
        QuantSpec(
            bits=8,
            signed=signed,
            symmetric=symmetric,
            axes=axes,
            group_size=group_size,
            calibration=calibration,
        )
        for signed, symmetric in ((True, True), (False, True), (True, False), (False, False))
    )
    outputs = jax.device_get(_run_specs(x, specs))
    for spec, (cal_scale, cal_zero, q, x_hat, fq) in zip(specs, outputs, strict=True):
        ref.check_calibration(x, spec, cal_scale, cal_zero)
        ref.check_quantized(x, spec, q.scale, q.zero_point, q.qvalue, x_hat, fq)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clips_heavy_tails(symmetric):
    """Many small values and one moderate outlier per channel: clipping pays."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 3)).astype(np.float32)
    x[0] = [12.0, -15.0, 20.0]
    spec = QuantSpec(bits=4, symmetric=symmetric, axes=(-1,), calibration="mse")
    q = jax.jit(quantize, static_argnames="spec")(x, spec)
    ref.check_quantized(x, spec, q.scale, q.zero_point, q.qvalue, dequantize(q))
    full = QuantSpec(bits=4, symmetric=symmetric, axes=(-1,), calibration="minmax")
    full_scale = ref.calibrate(x, full)[0]
    assert np.all(np.asarray(q.scale) < 0.9 * full_scale), np.asarray(q.scale) / full_scale


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_with_given_grouped_scale(symmetric, signed):
    x = np.random.default_rng(5).standard_normal((8, 3)).astype(np.float32) * 3
    spec = QuantSpec(bits=4, signed=signed, symmetric=symmetric, axes=(-1,), group_size=4)
    scale = np.array([[0.25, 0.5, 1.0], [0.125, 2.0, 0.75]], np.float32)
    zero = None if symmetric else np.array([[1, 2, 3], [0, 5, 7]])
    if not symmetric and signed:
        zero = zero - 4
    q = jax.jit(quantize, static_argnames="spec")(x, spec, scale=scale, zero_point=zero)
    full_scale = np.repeat(scale, 4, axis=0)
    full_zero = 0 if symmetric else np.repeat(zero, 4, axis=0)
    expected = ref.quantize_values(x, full_scale, full_zero, bits=4, signed=signed)
    np.testing.assert_array_equal(np.asarray(q.qvalue).astype(np.int64), expected)
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    fq = jax.jit(fake_quant, static_argnames="spec")(x, spec, scale=scale, zero_point=zero)
    np.testing.assert_array_equal(
        np.asarray(fq), ref.dequantize_values(expected, full_scale, full_zero)
    )


def test_given_scalar_scale_broadcasts():
    x = np.array([[0.3, -1.2], [2.6, 9.0]], np.float32)
    q = quantize(x, QuantSpec(bits=4), scale=0.5)
    np.testing.assert_array_equal(np.asarray(q.qvalue), [[1, -2], [5, 7]])


def test_given_zero_point_rules():
    x = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"zero_point must be None for a symmetric spec"):
        quantize(x, QuantSpec(), scale=1.0, zero_point=0)
    with pytest.raises(ValueError, match=r"zero_point is required.*symmetric=False"):
        quantize(x, QuantSpec(symmetric=False), scale=1.0)
    with pytest.raises(ValueError, match=r"zero_point was given without scale"):
        quantize(x, QuantSpec(symmetric=False), zero_point=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_tiny_range_gets_unit_scale(symmetric):
    # bound / qmax (and range / 255) fall below the smallest normal float32
    x = np.array([[1e-37, -1e-37, 0.0], [3.0, -2.0, 5e-38]], np.float32).T
    spec = QuantSpec(bits=8, symmetric=symmetric, axes=(-1,))
    q = jax.jit(quantize, static_argnames="spec")(x, spec)
    assert float(q.scale[0, 0]) == 1.0
    assert float(q.scale[0, 1]) != 1.0
    ref.check_quantized(x, spec, q.scale, q.zero_point, q.qvalue, dequantize(q))
    zero = 0 if symmetric else int(q.zero_point[0, 0])
    np.testing.assert_array_equal(np.asarray(q.qvalue)[:, 0], [zero] * 3)


# Every mode for the degenerate tensors: 4 calibrations x signed/unsigned x
# symmetric/affine (per channel, so every channel is degenerate).
_DEGENERATE_SPECS = tuple(
    QuantSpec(bits=bits, signed=signed, symmetric=symmetric, axes=(-1,), calibration=calibration)
    for calibration in ("absmax", "minmax", "percentile,99.5", "mse")
    for signed, symmetric, bits in (
        (True, True, 8),
        (False, True, 8),
        (True, False, 8),
        (False, False, 1),
    )
)


@pytest.mark.parametrize("value", [0.0, 2.75, -2.75, 1e30, -3e-3])
def test_zero_and_constant_tensors(value):
    x = np.full((7, 3), value, np.float32)
    outputs = jax.device_get(_run_specs(x, _DEGENERATE_SPECS))
    for spec, (cal_scale, _, q, x_hat, fq) in zip(_DEGENERATE_SPECS, outputs, strict=True):
        scale = np.asarray(q.scale)
        assert np.all(np.isfinite(scale)) and np.all(scale > 0), spec
        assert np.all(np.isfinite(np.asarray(cal_scale))), spec
        assert not np.isnan(x_hat).any() and not np.isnan(fq).any(), spec
        if value == 0.0:
            np.testing.assert_array_equal(scale, np.ones_like(scale))
            np.testing.assert_array_equal(fq, np.zeros_like(x))
        ref.check_quantized(x, spec, q.scale, q.zero_point, q.qvalue, x_hat, fq)


@pytest.mark.parametrize("fn", ["calibrate", "quantize", "fake_quant"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_outside_jit(fn, bad):
    x = np.ones((3, 4), np.float32)
    x[1, 2] = bad
    call = {"calibrate": calibrate, "quantize": quantize, "fake_quant": fake_quant}[fn]
    with pytest.raises(ValueError, match=r"x contains 1 non-finite value\(s\).* out of 12"):
        call(x, QuantSpec(axes=(-1,)))


@functools.partial(jax.jit, static_argnames="spec")
def _quantize_roundtrip(x, spec):
    q = quantize(x, spec)
    return q.scale, q.zero_point, q.qvalue, dequantize(q), fake_quant(x, spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, axes=(-1,)),
        QuantSpec(bits=4, symmetric=False, axes=(-1,), calibration="minmax"),
        QuantSpec(bits=8, signed=False, axes=(-1,), calibration="percentile,90"),
        QuantSpec(bits=3, symmetric=False, axes=(-1,), group_size=3, calibration="mse"),
    ],
    ids=["absmax", "affine-minmax", "unsigned-percentile", "grouped-affine-mse"],
)
def test_non_finite_poisons_only_its_group_under_jit(spec, bad):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((6, 4)) * 2).astype(np.float32)
    x[4, 1] = bad  # channel 1 (and, grouped, its second group of rows 3..5)
    scale, zero, qvalue, x_hat, fq = jax.device_get(_quantize_roundtrip(x, spec))
    if spec.group_size is None:
        bad_groups = np.zeros((1, 4), bool)
        bad_groups[0, 1] = True
        affected = np.zeros(x.shape, bool)
        affected[:, 1] = True
    else:
        bad_groups = np.zeros((2, 4), bool)
        bad_groups[1, 1] = True
        affected = np.zeros(x.shape, bool)
        affected[3:, 1] = True
    assert np.isnan(scale[bad_groups]).all()
    assert np.isfinite(scale[~bad_groups]).all()
    assert np.isnan(x_hat[affected]).all(), x_hat
    assert np.isnan(fq[affected]).all(), fq
    assert np.isfinite(x_hat[~affected]).all() and np.isfinite(fq[~affected]).all()
    # the clean channels are exactly what the reference gives without channel 1
    keep = [0, 2, 3]
    ref.check_quantized(
        x[:, keep],
        spec,
        scale[:, keep],
        None if zero is None else zero[:, keep],
        qvalue[:, keep],
        x_hat[:, keep],
        fq[:, keep],
    )


def test_non_finite_per_tensor_under_jit_is_all_nan():
    x = np.array([1.0, np.nan, -2.0], np.float32)
    scale, _, _, x_hat, fq = _quantize_roundtrip(x, QuantSpec(bits=8))
    assert np.isnan(np.asarray(scale)).all()
    assert np.isnan(np.asarray(x_hat)).all() and np.isnan(np.asarray(fq)).all()


def test_fake_quant_keeps_dtype_and_shape():
    x = jnp.asarray(np.linspace(-2, 2, 12).reshape(3, 4), jnp.bfloat16)
    fq = jax.jit(fake_quant, static_argnames="spec")(x, QuantSpec(bits=8, axes=(-1,)))
    assert fq.dtype == jnp.bfloat16 and fq.shape == (3, 4)


def test_jit_and_eager_calibrations_agree_bitwise():
    """The same call must not give different numbers under jit.

    x = 4137.3926 everywhere, 8-bit absmax: eagerly the scale is the float32
    quotient 4137.3926 / 127 = 32.577896 (the spec's s = bound / qmax); under jit
    XLA rewrites the division by the constant qmax into a multiplication by
    1 / 127 and returns 32.577892, one ulp lower.
    """
    x = np.full((4, 6), 4137.3926, np.float32)
    spec = QuantSpec(bits=8)
    expected = np.float32(4137.3926) / np.float32(127)
    eager = np.asarray(calibrate(x, spec)[0])
    jitted = np.asarray(jax.jit(calibrate, static_argnames="spec")(x, spec)[0])
    np.testing.assert_array_equal(jitted, eager)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(eager, [[expected]])
    else:
        # GPU float32 division is correctly rounded only to within 1 ulp.
        np.testing.assert_array_max_ulp(eager, np.array([[expected]]), maxulp=1)


@pytest.mark.parametrize("magnitude", [1.0, 1e-20, 1e20])
def test_mse_calibration_does_not_depend_on_magnitude(magnitude):
    """The mse ratio minimises the squared error whatever the tensor's magnitude.

    With |x| ~ 1e-20 the candidates' float32 squared errors underflow (to zero or
    to subnormals with a few bits left), so they tie or compare wrongly and a far
    too small ratio wins (0.10 here; 0.01 for smaller tensors, clipping them to 1%
    of their range); with |x| ~ 1e20 every error overflows to inf, none beats the
    initial inf and ratio 1.00 is kept. The minimiser (computed in float64) is 0.55
    at every magnitude for this data.
    """
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 1)).astype(np.float32)
    x[0] = 12.0
    x = (x * np.float32(magnitude)).astype(np.float32)
    spec = QuantSpec(bits=4, axes=(-1,), calibration="mse")
    q = jax.jit(quantize, static_argnames="spec")(x, spec)
    ref.check_quantized(x, spec, q.scale, q.zero_point, q.qvalue, dequantize(q))
    ratio = float(q.scale[0, 0]) / (float(np.abs(x).max()) / 7)
    assert abs(ratio - 0.55) < 1e-4, ratio
