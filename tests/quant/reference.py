"""An independent numpy reference for the uniform integer quantizer of `kdq.quant`.

Everything here follows the `QuantSpec` / `kdq.quant.numerics` docstrings
literally, in float32 numpy arithmetic (IEEE division, `np.round` half to even),
and never imports kdq: the `check_*` helpers receive kdq's outputs as arrays
(and read only the plain fields of a spec) and compare them with these functions.

Grouping is derived per element: an element's scale group is given by its
indices on the kept axes, plus (for `group_size`) its index on the contraction
axis (the last non-kept axis) divided by `group_size`.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
TINY = np.finfo(np.float32).tiny
MSE_RATIOS = [F32(k) / F32(100) for k in range(1, 101)]

# Slack between the reference (IEEE float32 division) and XLA: XLA rewrites a
# division by a broadcast or constant operand (`x / scale`, `bound / qmax`) into
# a multiplication by the reciprocal, `a * (1 / b)`. Two
# roundings instead of one put the quotient within 2u = 2^-23 (relative) of the
# exact value, so at most 2 ulp from the correctly rounded one (1 ulp is what is
# observed). Scales are therefore compared to 2 ulp.
SCALE_ULPS = 2
# Where x / s lies this close (relative) to a rounding midpoint k + 1/2, a 2-ulp
# scale difference plus the reciprocal rounding (together < 4 * 2^-23 relative)
# can move it to the other side: there the integer may differ by one.
AMBIGUOUS_REL = 2.0**-20


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a bits-wide (un)signed integer."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def storage_dtype_name(bits: int, signed: bool) -> str:
    """The narrowest storage dtype name: (u)int4, (u)int8 or (u)int16."""
    width = 4 if bits <= 4 else 8 if bits <= 8 else 16
    return f"{'' if signed else 'u'}int{width}"


def parse_calibration(calibration: str) -> tuple[str, float | None]:
    if calibration.startswith("percentile,"):
        return "percentile", float(calibration.split(",", 1)[1])
    return calibration, None


def groups(
    shape: tuple[int, ...], axes: tuple[int, ...], group_size: int | None
) -> tuple[tuple[int, ...], np.ndarray]:
    """(scale shape, flat group id of every element)."""
    ndim = len(shape)
    kept = {a % ndim for a in axes}
    reduced = [a for a in range(ndim) if a not in kept]
    grouped = reduced[-1] if group_size else None
    scale_shape = []
    for a in range(ndim):
        if a in kept:
            scale_shape.append(shape[a])
        elif a == grouped:
            scale_shape.append(shape[a] // group_size)
        else:
            scale_shape.append(1)
    index = np.indices(shape)
    scale_index = []
    for a in range(ndim):
        if a in kept:
            scale_index.append(index[a])
        elif a == grouped:
            scale_index.append(index[a] // group_size)
        else:
            scale_index.append(np.zeros(shape, dtype=np.int64))
    return tuple(scale_shape), np.ravel_multi_index(scale_index, scale_shape)


def group_range(
    values: np.ndarray, *, signed: bool, symmetric: bool, method: str, p: float | None
) -> tuple[np.float32, np.float32]:
    """Calibrated [lo, hi] of one scale group (widened to contain 0)."""
    values = np.asarray(values, F32).ravel()
    if symmetric:
        magnitude = np.abs(values) if signed else np.maximum(values, F32(0))
        if method == "percentile":
            hi = F32(np.percentile(magnitude, p, method="linear"))
        else:
            hi = magnitude.max()
        return F32(-hi), F32(hi)
    if method == "absmax":
        hi = np.abs(values).max()
        lo = -hi
    elif method == "percentile":
        # The lower bound is the smaller of the two percentiles p and 100 - p.
        lo = F32(np.percentile(values, min(p, 100.0 - p), method="linear"))
        hi = F32(np.percentile(values, max(p, 100.0 - p), method="linear"))
    else:  # "minmax", and "mse" (which searches fractions of the minmax range)
        lo, hi = values.min(), values.max()
    return F32(min(lo, F32(0))), F32(max(hi, F32(0)))


def scale_and_zero(
    lo: np.float32, hi: np.float32, *, bits: int, signed: bool, symmetric: bool
) -> tuple[np.float32, np.float32]:
    """(scale, zero point) for [lo, hi]; zero point 0 when symmetric."""
    qmin, qmax = int_range(bits, signed)
    if symmetric:
        scale = F32(hi) / F32(qmax)
    else:
        scale = (F32(hi) - F32(lo)) / F32(qmax - qmin)
    if scale < TINY:
        scale = F32(1)
    if symmetric:
        return F32(scale), F32(0)
    zero = np.clip(F32(qmin) - np.round(F32(lo) / scale), qmin, qmax)
    return F32(scale), F32(zero)


def quantize_values(
    x: np.ndarray, scale: np.ndarray, zero: np.ndarray, *, bits: int, signed: bool
) -> np.ndarray:
    """clip(round(x / s) + z, qmin, qmax) in float32 (s, z broadcast to x)."""
    qmin, qmax = int_range(bits, signed)
    x = np.asarray(x, F32)
    q = np.round(x / np.asarray(scale, F32)) + np.asarray(zero, F32)
    return np.clip(q, qmin, qmax).astype(F32)


def dequantize_values(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """(q - z) * s in float32."""
    return ((np.asarray(q, F32) - np.asarray(zero, F32)) * np.asarray(scale, F32)).astype(F32)


def mse_candidates(
    values: np.ndarray, *, bits: int, signed: bool, symmetric: bool
) -> list[tuple[np.float32, np.float32, float, np.float32]]:
    """For each ratio r = 0.01 .. 1.00: (scale, zero, squared error, r * lo)."""
    values = np.asarray(values, F32).ravel()
    lo, hi = group_range(values, signed=signed, symmetric=symmetric, method="mse", p=None)
    out = []
    for ratio in MSE_RATIOS:
        lo_r, hi_r = F32(lo * ratio), F32(hi * ratio)
        scale, zero = scale_and_zero(lo_r, hi_r, bits=bits, signed=signed, symmetric=symmetric)
        q = quantize_values(values, scale, zero, bits=bits, signed=signed)
        err = float(np.sum((dequantize_values(q, scale, zero).astype(np.float64) - values) ** 2))
        out.append((scale, zero, err, lo_r))
    return out


def mse_error_slack(
    values: np.ndarray, scale: np.float32, zero: np.float32, *, bits: int, signed: bool
) -> float:
    """How far a float32 evaluation of one candidate's squared error can stray.

    kdq evaluates each candidate with a scale up to SCALE_ULPS ulp away from the
    reference's (see SCALE_ULPS), so each reconstruction (q - z) * s may move by
    delta = (|q - z| + 1) * 2 * SCALE_ULPS * ulp(s) + 2 ulp(x_hat), changing r^2 by
    at most 2 |r| delta + delta^2; an integer at a rounding midpoint may round the
    other way, changing r^2 = s^2 (q - x / s)^2 by at most 2 s^2 * band * |x / s|;
    and a float32 sum of n terms is off by at most (n + 2) u relative. With many
    integer levels a one-ulp scale change moves the error noticeably, so near-ties
    between ratios are genuinely undecidable at float32 precision.
    """
    values = np.asarray(values, F32).ravel()
    q = quantize_values(values, scale, zero, bits=bits, signed=signed).astype(np.float64)
    x_hat = dequantize_values(q, scale, zero)
    r = x_hat.astype(np.float64) - values
    levels = np.abs(q - float(zero))
    ulp_s = float(np.spacing(np.abs(F32(scale))))
    delta = (levels + 1) * 2 * SCALE_ULPS * ulp_s + 2 * np.spacing(np.abs(x_hat)).astype(np.float64)
    band = AMBIGUOUS_REL + SCALE_ULPS * ulp_s / float(scale)
    t = values.astype(np.float64) / float(scale)
    flips = near_midpoint(t, band) * 2 * float(scale) ** 2 * band * np.abs(t)
    summation = (values.size + 2) * 2.0**-24 * float(np.sum(r**2))
    return float(np.sum(2 * np.abs(r) * delta + delta**2) + np.sum(flips) + summation)


def calibrate(x: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference (scale, zero point, lo) per group for the non-mse calibrations.

    `spec` is read only for its plain fields (bits, signed, symmetric, axes,
    group_size, calibration); the integer range is recomputed here.
    """
    method, p = parse_calibration(spec.calibration)
    assert method != "mse", "use mse_candidates"
    x = np.asarray(x, F32)
    scale_shape, gid = groups(x.shape, spec.axes, spec.group_size)
    n = int(np.prod(scale_shape))
    scale = np.empty(n, F32)
    zero = np.empty(n, F32)
    low = np.empty(n, F32)
    for g in range(n):
        lo, hi = group_range(
            x[gid == g], signed=spec.signed, symmetric=spec.symmetric, method=method, p=p
        )
        scale[g], zero[g] = scale_and_zero(
            lo, hi, bits=spec.bits, signed=spec.signed, symmetric=spec.symmetric
        )
        low[g] = lo
    return scale.reshape(scale_shape), zero.reshape(scale_shape), low.reshape(scale_shape)


def near_midpoint(t: np.ndarray, rel: float = AMBIGUOUS_REL, abs_tol: float = 0.0) -> np.ndarray:
    """True where t is within rel * |t| + abs_tol of a rounding midpoint k + 1/2."""
    t = np.asarray(t, np.float64)
    return np.abs(t - np.floor(t) - 0.5) <= rel * np.abs(t) + abs_tol


def within_ulps(actual: np.ndarray, expected: np.ndarray, ulps: float) -> np.ndarray:
    """Elementwise |actual - expected| <= ulps * ulp(expected), in float32 ulps."""
    actual = np.asarray(actual, np.float64)
    expected32 = np.asarray(expected, F32)
    return np.abs(actual - expected32.astype(np.float64)) <= ulps * np.spacing(
        np.abs(expected32)
    ).astype(np.float64)


def _percentile_is_exact(n: int, p: float) -> bool:
    """Whether p's linear interpolation index (n - 1) * p / 100 is an integer in float32.

    Then every implementation returns an order statistic exactly; otherwise the
    interpolated value depends on the arithmetic order (numpy lerps in one way,
    jax in another) within the bound of `_percentile_tolerance`.
    """
    q32 = F32(p) / F32(100)
    index = float(q32) * (n - 1)
    return float(q32) * 100 == p and index == int(index) and float(F32(index)) == index


def _percentile_tolerance(values: np.ndarray, p: float) -> float:
    """Bound on the difference of two float32 linear-interpolation percentiles.

    The index (n - 1) * p / 100 is rounded twice (relative 2u, u = 2^-24), which
    moves the result by at most 2u(n - 1) times the gap between neighbours
    (<= 2 max|v|); the interpolation adds a few roundings of max|v|. 4n + 8
    units of u * max|v| covers both implementations' error.
    """
    n = values.size
    if _percentile_is_exact(n, p):
        return 0.0
    return (4 * n + 8) * 2.0**-24 * float(np.max(np.abs(values)))


def check_calibration(x: np.ndarray, spec, scale, zero_point) -> dict:
    """Asserts (scale, zero_point) is the calibration the spec prescribes for x.

    Returns the reference values the quantization checks need: per-group
    reference scale, kdq's (validated) zero point, a per-group relative
    ambiguity band for x / s, and for mse the best reference error per group.
    """
    x = np.asarray(x, F32)
    qmin, qmax = int_range(spec.bits, spec.signed)
    method, p = parse_calibration(spec.calibration)
    scale_shape, gid = groups(x.shape, spec.axes, spec.group_size)
    scale = np.asarray(scale)
    assert scale.dtype == np.float32, scale.dtype
    assert scale.shape == scale_shape, (scale.shape, scale_shape)
    if spec.symmetric:
        assert zero_point is None, "a symmetric spec has no zero point"
        zero = np.zeros(scale_shape, np.int64)
    else:
        zero_arr = np.asarray(zero_point)
        assert zero_arr.dtype.name == storage_dtype_name(spec.bits, spec.signed), zero_arr.dtype
        assert zero_arr.shape == scale_shape, (zero_arr.shape, scale_shape)
        zero = zero_arr.astype(np.int64)
    n = int(np.prod(scale_shape))
    ref_scale = np.empty(n, F32)
    rel_band = np.empty(n, np.float64)
    best_error = np.full(n, np.nan)
    for g in range(n):
        values = x[gid == g]
        got_s = scale.ravel()[g]
        got_z = int(zero.ravel()[g])
        extra_tol = 0.0
        lo_tol = 0.0
        if method == "mse":
            candidates = mse_candidates(
                values, bits=spec.bits, signed=spec.signed, symmetric=spec.symmetric
            )
            matching = [c for c in candidates if within_ulps(got_s, c[0], SCALE_ULPS)]
            assert matching, (
                f"group {g}: mse scale {got_s!r} is none of the candidate ratios' scales "
                f"{sorted({float(c[0]) for c in candidates})}"
            )
            s_ref, z_ref, chosen_error, lo_used = matching[0]
            best = min(candidates, key=lambda c: c[2])
            kw = {"bits": spec.bits, "signed": spec.signed}
            slack = mse_error_slack(values, best[0], best[1], **kw) + mse_error_slack(
                values, s_ref, z_ref, **kw
            )
            # kdq must have picked a minimiser up to float32 evaluation noise
            assert chosen_error <= best[2] + slack, (
                f"group {g}: mse picked scale {got_s!r} with error {chosen_error!r}, "
                f"but scale {best[0]!r} has error {best[2]!r} (slack {slack:g})"
            )
            best_error[g] = best[2] + slack
        else:
            lo_used, hi = group_range(
                values, signed=spec.signed, symmetric=spec.symmetric, method=method, p=p
            )
            s_ref, z_ref = scale_and_zero(
                lo_used, hi, bits=spec.bits, signed=spec.signed, symmetric=spec.symmetric
            )
            if method == "percentile":
                if spec.symmetric:
                    mag = np.abs(values) if spec.signed else np.maximum(values, F32(0))
                    extra_tol = _percentile_tolerance(mag, p) / qmax
                else:
                    lo_tol = _percentile_tolerance(values, min(p, 100.0 - p))
                    hi_tol = _percentile_tolerance(values, max(p, 100.0 - p))
                    extra_tol = (lo_tol + hi_tol) / (qmax - qmin)
        s_tol = SCALE_ULPS * float(np.spacing(np.abs(s_ref))) + extra_tol
        assert abs(float(got_s) - float(s_ref)) <= s_tol, (
            f"group {g}: scale {got_s!r}, reference {s_ref!r} (tolerance {s_tol:g})"
        )
        rel = AMBIGUOUS_REL + s_tol / float(s_ref)
        if not spec.symmetric:
            # z = qmin - round(lo / s): lo / s is uncertain by the scale's band and,
            # for an interpolated percentile, by lo's own tolerance
            t_zero = float(lo_used) / float(s_ref)
            assert got_z == int(z_ref) or (
                abs(got_z - int(z_ref)) == 1
                and near_midpoint(t_zero, rel, abs_tol=lo_tol / float(s_ref))
            ), f"group {g}: zero point {got_z}, reference {int(z_ref)} (lo / s = {t_zero!r})"
        ref_scale[g] = s_ref
        rel_band[g] = rel
    return {
        "gid": gid,
        "ref_scale": ref_scale,
        "zero": zero.ravel(),
        "rel_band": rel_band,
        "best_error": best_error,
        "qmin": qmin,
        "qmax": qmax,
    }


def check_quantized(
    x: np.ndarray, spec, scale, zero_point, qvalue, dequantized=None, fake_quantized=None
) -> None:
    """Asserts a quantization of x under spec agrees with the reference.

    * scale / zero point: as `check_calibration`;
    * integers: q = clip(round(x / s) + z, qmin, qmax) exactly, except where
      x / s is within the float ambiguity band of a midpoint (then by at most 1);
    * dequantized / fake-quantized: exactly (q - z) * s of the returned integers
      and scale (a product: no reordering can change it);
    * mse: the reconstruction error is no worse than the best candidate ratio's.
    """
    x = np.asarray(x, F32)
    ref = check_calibration(x, spec, scale, zero_point)
    gid = ref["gid"]
    qvalue = np.asarray(qvalue)
    assert qvalue.dtype.name == storage_dtype_name(spec.bits, spec.signed), qvalue.dtype
    assert qvalue.shape == x.shape
    q = qvalue.astype(np.int64)
    assert q.min() >= ref["qmin"] and q.max() <= ref["qmax"]
    s_full = ref["ref_scale"][gid]
    z_full = ref["zero"][gid]
    expected_q = quantize_values(x, s_full, z_full, bits=spec.bits, signed=spec.signed)
    expected_q = expected_q.astype(np.int64)
    ambiguous = near_midpoint(x.astype(np.float64) / s_full, ref["rel_band"][gid])
    clear_mismatch = (q != expected_q) & ~ambiguous
    assert not clear_mismatch.any(), (
        f"{int(clear_mismatch.sum())} integer(s) differ from the reference at "
        f"{np.argwhere(clear_mismatch)[:5].tolist()}: got {q[clear_mismatch][:5].tolist()}, "
        f"expected {expected_q[clear_mismatch][:5].tolist()}, x {x[clear_mismatch][:5].tolist()}"
    )
    assert np.all(np.abs(q - expected_q) <= 1)
    got_scale = np.asarray(scale).ravel()[gid]
    expected_x_hat = dequantize_values(q, got_scale, z_full)
    for name, got in (("dequantize", dequantized), ("fake_quant", fake_quantized)):
        if got is not None:
            got = np.asarray(got)
            assert got.dtype == np.float32, (name, got.dtype)
            np.testing.assert_array_equal(got, expected_x_hat, err_msg=name)
    if parse_calibration(spec.calibration)[0] == "mse":
        error = np.zeros(ref["best_error"].size)
        np.add.at(error, gid.ravel(), ((expected_x_hat.astype(np.float64) - x) ** 2).ravel())
        # best_error already includes the float32 evaluation slack (mse_error_slack)
        assert np.all(error <= ref["best_error"] * (1 + 1e-6)), (error, ref["best_error"])
