"""Uniform integer quantization: calibrate -> quantize -> dequantize.

For a `QuantSpec` with integer range [qmin, qmax]:

  symmetric:  s = bound / qmax,                    q = clip(round(x / s), qmin, qmax)
  affine:     s = (hi - lo) / (qmax - qmin),       z = clip(qmin - round(lo / s), qmin, qmax)
                                                   q = clip(round(x / s) + z, qmin, qmax)
  dequantize: x_hat = (q - z) * s                  (z = 0 when symmetric)

`round` is round-half-to-even, or stochastic rounding floor(x / s + u) with
u ~ U[0, 1). Scales have the rank of x: the full size on `spec.axes`, 1 on the
reduced axes, and n / group_size on a grouped axis.

Edge cases, by design:
  * A group whose range is zero (all-zero or constant-zero) or too small to
    give a normal float32 scale gets scale 1.0: finite, non-zero, and every
    value quantizes to the zero point.
  * The public functions validate their arguments in Python and run one
    jitted computation, so results are bitwise the same called eagerly or
    inside an outer `jit` (on traced arguments or on closed-over arrays).
  * Arguments are checked whenever their values are concrete: called
    eagerly, and also inside `jit`, `vmap` or `grad` for arrays that are not
    traced (constants closed over by the traced function). Only the traced
    arguments of an enclosing transformation go unchecked, since their values
    do not exist yet; for those the results below are NaN, never finite
    numbers that look valid.
  * Non-finite input (NaN, +-inf) has no quantized value. When x is concrete,
    `calibrate`, `quantize` and `fake_quant` raise `ValueError`. When x is
    traced, the scale of every group containing a non-finite value is NaN, so
    dequantized values of that group are NaN; `fake_quant` with a given scale
    returns NaN where x is non-finite.
  * A given range (`scale=`, `zero_point=`) must have every scale a finite
    float32 of at least 2^-126 (the smallest normal float32; 0, negative,
    NaN and inf scales have no quantization grid) and every zero point an
    integer in [qmin, qmax] (the storage dtype holds no other value). Concrete
    values that break this raise `ValueError`. Traced ones give a NaN scale
    for each offending group, so `fake_quant` and `dequantize` return NaN
    there (the group's stored zero point is 0).
  * `scale_from_range` needs finite bounds (hi, and lo when affine): concrete
    non-finite bounds raise `ValueError`, traced ones give a NaN scale.
"""

from __future__ import annotations

import contextlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdq.quant.qarray import QArray
from kdq.quant.spec import QuantSpec
from kdq.quant.ste import clipped_straight_through, straight_through

_MSE_RATIOS = np.arange(1, 101, dtype=np.float32) / np.float32(100)
_SMALLEST_SCALE = float(np.finfo(np.float32).tiny)


def _kept_axes(shape: tuple[int, ...], spec: QuantSpec) -> list[int]:
    """`spec.axes` as non-negative axes of an array of `shape`; ValueError if invalid."""
    ndim = len(shape)
    kept = []
    for axis in spec.axes:
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"axes={spec.axes} has axis {axis} out of range for an array of shape {shape}"
            )
        kept.append(axis % ndim)
    if len(set(kept)) != len(kept):
        raise ValueError(
            f"axes={spec.axes} names the same axis twice for an array of shape {shape}"
        )
    return kept


def group_axis(shape: tuple[int, ...], spec: QuantSpec) -> int | None:
    """The axis `spec.group_size` splits into groups: the last axis not in `spec.axes`.

    For a Dense kernel (in, out) or a Conv kernel (..., in, out) with
    axes=(-1,) it is the input (contraction) axis; for other kernels see
    `kdq.quant.contraction`.

    Args:
      shape: shape of the array to quantize.
      spec: the quantizer.

    Returns:
      The non-negative grouped axis, or None when `spec.group_size` is None.

    Raises:
      ValueError: `spec.axes` is out of range or repeats an axis, or the spec
        keeps every axis (nothing left to group).

    >>> group_axis((16, 4, 8), QuantSpec(bits=4, axes=(1, 2), group_size=8))
    0
    """
    kept = _kept_axes(shape, spec)
    if spec.group_size is None:
        return None
    reduced = [a for a in range(len(shape)) if a not in kept]
    if not reduced:
        raise ValueError(
            f"group_size={spec.group_size} needs an axis to group, but axes={spec.axes} "
            f"keeps every axis of shape {shape}"
        )
    return reduced[-1]


def scale_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """The shape of the scale (and zero point) for an array of `shape`.

    Args:
      shape: shape of the array to quantize.
      spec: the quantizer.

    Returns:
      A tuple of len(shape): shape[a] on kept axes, 1 on reduced axes,
      shape[g] // group_size on the grouped axis g (`group_axis`, the last
      reduced axis).
    """
    kept = _kept_axes(shape, spec)
    result = [n if a in kept else 1 for a, n in enumerate(shape)]
    axis = group_axis(shape, spec)
    if axis is not None:
        if shape[axis] % spec.group_size:
            raise ValueError(
                f"group_size={spec.group_size} does not divide axis {axis} of size "
                f"{shape[axis]} (array shape {shape})"
            )
        result[axis] = shape[axis] // spec.group_size
    return tuple(result)


def _grouped_view(x: jax.Array, target: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """Reshapes x so that reducing the returned axes (keepdims) gives `target`."""
    shape, reduce_axes = [], []
    for n, d in zip(x.shape, target, strict=True):
        if d == n:
            shape.append(n)
        elif d == 1:
            shape.append(n)
            reduce_axes.append(len(shape) - 1)
        else:
            shape += [d, n // d]
            reduce_axes.append(len(shape) - 1)
    return x.reshape(shape), tuple(reduce_axes)


def _reduce(x: jax.Array, target: tuple[int, ...], op, **kwargs) -> jax.Array:
    view, axes = _grouped_view(x, target)
    return op(view, axis=axes, keepdims=True, **kwargs).reshape(target)


def _expand(scale: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Repeats a grouped scale so that it broadcasts against `shape`."""
    for axis, (d, n) in enumerate(zip(scale.shape, shape, strict=True)):
        if d not in (1, n):
            scale = jnp.repeat(scale, n // d, axis=axis, total_repeat_length=n)
    return scale


def _is_concrete(x: object) -> bool:
    """Whether x has values now: not a Tracer of the current or an outer trace."""
    return not isinstance(x, jax.core.Tracer)


def _now_if_concrete(*values: object) -> contextlib.AbstractContextManager:
    """A context that runs operations immediately when every value is concrete.

    Inside an enclosing `jit`, `vmap` or `grad`, arrays closed over by the
    traced function are concrete: with this context their checks and their
    quantization run now, exactly as in an eager call, and the result enters
    the trace as a constant (staged instead, the computation on constants
    could be folded by XLA with different roundings). Any traced value: no
    change, everything is staged as usual.
    """
    if all(_is_concrete(leaf) for leaf in jax.tree_util.tree_leaves(values)):
        return jax.core.eval_context()
    return contextlib.nullcontext()


def _check_finite_if_concrete(x: jax.Array, name: str) -> None:
    if not _is_concrete(x):
        return
    with jax.core.eval_context():
        bad = int(jnp.size(x) - jnp.count_nonzero(jnp.isfinite(x)))
    if bad:
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN or inf) out of {x.size}; "
            "quantization needs finite input: find where they come from, or mask them"
        )


def _as_float(x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _runtime_constant(value: float) -> jax.Array:
    """A float32 constant that XLA cannot fold into the expression using it."""
    return jax.lax.optimization_barrier(jnp.float32(value))


def _scale_and_zero_point(
    lo: jax.Array, hi: jax.Array, spec: QuantSpec
) -> tuple[jax.Array, jax.Array | None]:
    """Scale and zero point for the range [lo, hi] (lo <= 0 <= hi)."""
    # The barrier keeps XLA from turning the division by a constant into a
    # multiplication by its (inexact) reciprocal: s is the IEEE quotient.
    if spec.symmetric:
        scale = hi / _runtime_constant(spec.qmax)
    else:
        levels = _runtime_constant(spec.qmax - spec.qmin)
        width = hi - lo
        # A finite range wider than float32 (e.g. [-3e38, 3e38]) overflows hi - lo.
        overflow = jnp.isinf(width) & jnp.isfinite(lo) & jnp.isfinite(hi)
        scale = jnp.where(overflow, hi / levels - lo / levels, width / levels)
    scale = jnp.where(scale < _SMALLEST_SCALE, 1.0, scale)
    if spec.symmetric:
        return scale, None
    zero_point = jnp.clip(spec.qmin - jnp.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zero_point


def _quantize_values(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    spec: QuantSpec,
    noise: jax.Array | None = None,
) -> jax.Array:
    """Integer values (still float32) of x for a full-size scale/zero point."""
    v = x / jax.lax.optimization_barrier(scale)
    v = jnp.round(v) if noise is None else jnp.floor(v + noise)
    if zero_point is not None:
        v = v + zero_point
    return jnp.clip(v, spec.qmin, spec.qmax)


def _range(x: jax.Array, spec: QuantSpec, target: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Calibrated range [lo, hi] per scale group, widened to contain 0."""
    method, p = spec.calibration_method, spec.percentile
    if spec.symmetric:
        # Unsigned: negatives clip to 0; x * 0 keeps -inf (and NaN) visible as NaN.
        magnitude = jnp.abs(x) if spec.signed else jnp.where(x > 0, x, x * 0.0)
        if method == "percentile":
            hi = _reduce(magnitude, target, jnp.percentile, q=p)
        else:
            hi = _reduce(magnitude, target, jnp.max)
        return -hi, hi
    if method == "absmax":
        hi = _reduce(jnp.abs(x), target, jnp.max)
        lo = -hi
    elif method == "percentile":
        lo = _reduce(x, target, jnp.percentile, q=min(p, 100.0 - p))
        hi = _reduce(x, target, jnp.percentile, q=max(p, 100.0 - p))
    else:
        lo = _reduce(x, target, jnp.min)
        hi = _reduce(x, target, jnp.max)
    return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def _mse_clip_ratio(
    x: jax.Array, lo: jax.Array, hi: jax.Array, spec: QuantSpec, target: tuple[int, ...]
) -> jax.Array:
    """Per group, the ratio r minimising sum((fq(x; r * [lo, hi]) - x)^2).

    Ratios are 0.01, 0.02, ..., 1.00; the smallest minimiser wins ties. The
    search runs on x / max(|lo|, |hi|), so squared errors neither underflow
    nor overflow whatever the magnitude of x.
    """
    magnitude = jnp.maximum(-lo, hi)
    magnitude = jnp.where((magnitude > 0) & jnp.isfinite(magnitude), magnitude, 1.0)
    x = x / _expand(magnitude, x.shape)
    lo, hi = lo / magnitude, hi / magnitude

    def try_ratio(best, ratio):
        best_error, best_ratio = best
        scale, zero_point = _scale_and_zero_point(lo * ratio, hi * ratio, spec)
        full_scale = _expand(scale, x.shape)
        full_zero = None if zero_point is None else _expand(zero_point, x.shape)
        q = _quantize_values(x, full_scale, full_zero, spec)
        x_hat = (q - (0.0 if full_zero is None else full_zero)) * full_scale
        error = _reduce(jnp.square(x_hat - x), target, jnp.sum)
        better = error < best_error
        return (jnp.where(better, error, best_error), jnp.where(better, ratio, best_ratio)), None

    init = (jnp.full(target, jnp.inf, jnp.float32), jnp.ones(target, jnp.float32))
    (_, ratio), _ = jax.lax.scan(try_ratio, init, jnp.asarray(_MSE_RATIOS))
    return ratio


def _is_number_dtype(dtype: np.dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)


def _as_float32_values(value: ArrayLike, name: str) -> np.ndarray:
    """The concrete value as a float32 numpy array (as the computation sees it)."""
    try:
        given = np.asarray(value)
    except (TypeError, ValueError):
        given = np.asarray(None)
    if not _is_number_dtype(given.dtype):
        raise ValueError(f"{name} must be a float or float array, got {name}={value!r}")
    return given.astype(np.float32)


def _example(values: np.ndarray, bad: np.ndarray) -> str:
    """ "k of n, e.g. v": how many values are bad, and the first of them."""
    return f"{int(bad.sum())} of {bad.size}, e.g. {values[bad].ravel()[0].item()!r}"


def _check_bound_if_concrete(value: ArrayLike, name: str) -> None:
    if not _is_concrete(value):
        return
    values = _as_float32_values(value, name)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{name} must be finite (in float32), got non-finite {name} values "
            f"({_example(values, bad)}): a range needs finite bounds; check the statistics "
            "it was measured from"
        )


@partial(jax.jit, static_argnums=2)
def _scale_from_range(
    lo: jax.Array, hi: jax.Array, spec: QuantSpec
) -> tuple[jax.Array, jax.Array | None]:
    finite = jnp.isfinite(hi) if spec.symmetric else jnp.isfinite(lo) & jnp.isfinite(hi)
    scale, zero_point = _scale_and_zero_point(jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0), spec)
    scale = jnp.where(finite, scale, jnp.nan)
    return scale, None if zero_point is None else zero_point.astype(spec.dtype)


def scale_from_range(
    lo: ArrayLike, hi: ArrayLike, spec: QuantSpec
) -> tuple[jax.Array, jax.Array | None]:
    """Scale and zero point that represent [lo, hi] (widened to contain 0).

    Symmetric: s = max(hi, 0) / qmax. Affine: s = (max(hi, 0) - min(lo, 0)) /
    (qmax - qmin), z = clip(qmin - round(min(lo, 0) / s), qmin, qmax). A range
    too small for a normal float32 scale gets s = 1.

    Args:
      lo, hi: range bounds (any broadcastable shapes); for a symmetric spec
        only hi is used (the bound of |x|, or of max(x, 0) when unsigned).
        The bounds used must be finite: concrete non-finite ones raise
        `ValueError`; traced ones give a NaN scale.
      spec: the quantizer.

    Returns:
      (scale, zero_point) as in `calibrate`.
    """
    if not spec.symmetric:
        _check_bound_if_concrete(lo, "lo")
    _check_bound_if_concrete(hi, "hi")
    with _now_if_concrete(lo, hi):
        return _scale_from_range(jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32), spec)


def _poison_non_finite(x: jax.Array, scale: jax.Array) -> jax.Array:
    """NaN scale for every group of x that holds a non-finite value."""
    finite = _reduce(jnp.isfinite(x), scale.shape, jnp.all)
    return jnp.where(finite, scale, jnp.nan)


@partial(jax.jit, static_argnums=1)
def _calibrate(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    target = scale_shape(x.shape, spec)
    lo, hi = _range(x, spec, target)
    if spec.calibration_method == "percentile":
        # A percentile can be finite while its group holds inf: check the group.
        finite = _reduce(jnp.isfinite(x), target, jnp.all)
    else:
        # max / min see every value: a non-finite value makes the range non-finite.
        finite = jnp.isfinite(lo) & jnp.isfinite(hi)
    if spec.calibration_method == "mse":
        ratio = _mse_clip_ratio(x, lo, hi, spec, target)
        lo, hi = lo * ratio, hi * ratio
    scale, zero_point = _scale_and_zero_point(lo, hi, spec)
    scale = jnp.where(finite, scale, jnp.nan)
    if zero_point is not None:
        zero_point = zero_point.astype(spec.dtype)
    return scale, zero_point


def calibrate(x: ArrayLike, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
    """Chooses the scale and zero point of `spec` for the values of `x`.

    Args:
      x: array to be quantized, any shape.
      spec: the quantizer; its `calibration` picks the range (see `QuantSpec`).

    Returns:
      (scale, zero_point): float32 scale of shape `scale_shape(x.shape, spec)`,
      and the zero point (dtype `spec.dtype`, same shape), or None if
      `spec.symmetric`.
    """
    with _now_if_concrete(x):
        x = _as_float(x)
        _check_finite_if_concrete(x, "x")
        scale_shape(x.shape, spec)
        return _calibrate(x, spec)


def _check_scale_if_concrete(scale: ArrayLike) -> None:
    if not _is_concrete(scale):
        return
    values = _as_float32_values(scale, "scale")
    bad = ~(np.isfinite(values) & (values >= _SMALLEST_SCALE))
    if bad.any():
        given = np.broadcast_to(np.asarray(scale), values.shape)
        raise ValueError(
            f"scale must be finite and >= {_SMALLEST_SCALE:.8g} (the smallest normal float32) "
            f"in float32, got {_example(given, bad)}: zero, negative, NaN and infinite scales "
            "have no quantization grid, and subnormal ones are flushed to zero on "
            "accelerators; pass a positive scale, or omit scale to calibrate it"
        )


def _check_zero_point_if_concrete(zero_point: ArrayLike, spec: QuantSpec) -> None:
    if not _is_concrete(zero_point):
        return
    try:
        given = np.asarray(zero_point)
    except (TypeError, ValueError):
        given = np.asarray(None)
    if not _is_number_dtype(given.dtype):
        raise ValueError(f"zero_point must be an integer array, got zero_point={zero_point!r}")
    values = given.astype(np.float64)
    bad = values != np.round(values)
    if bad.any():
        raise ValueError(
            f"zero_point must hold integers, got non-integer values ({_example(given, bad)})"
        )
    bad = (values < spec.qmin) | (values > spec.qmax)
    if bad.any():
        raise ValueError(
            f"zero_point must lie in [qmin, qmax] = [{spec.qmin}, {spec.qmax}] for bits="
            f"{spec.bits}, signed={spec.signed}, got values outside ({_example(given, bad)}): "
            f"{spec.dtype} cannot store them; use a zero point the spec can represent"
        )


def _given_range(
    scale: jax.Array, zero_point: jax.Array | None, spec: QuantSpec
) -> tuple[jax.Array, jax.Array | None]:
    """The given range inside the computation: NaN scale where it is invalid.

    A group's scale becomes NaN unless it is finite and >= the smallest normal
    float32 and (affine) its zero point is an integer in [qmin, qmax]; the
    zero point is stored in `spec.dtype` (0 for an invalid one). Concrete
    arguments were checked before; this covers traced ones.
    """
    valid = jnp.isfinite(scale) & (scale >= _SMALLEST_SCALE)
    if zero_point is not None:
        z = zero_point.astype(jnp.float32)
        representable = (z == jnp.round(z)) & (z >= spec.qmin) & (z <= spec.qmax)
        valid = valid & representable
        zero_point = jnp.where(representable, z, 0.0).astype(spec.dtype)
    return jnp.where(valid, scale, jnp.nan), zero_point


def _check_given_range(
    x: jax.Array, spec: QuantSpec, scale: ArrayLike, zero_point: ArrayLike | None
) -> tuple[jax.Array, jax.Array | None]:
    _check_scale_if_concrete(scale)
    scale = jnp.asarray(scale, jnp.float32)
    given_shape = scale.shape
    if scale.ndim < x.ndim:
        scale = scale.reshape((1,) * (x.ndim - scale.ndim) + scale.shape)
    if scale.ndim != x.ndim or any(
        d != 1 and n % d for d, n in zip(scale.shape, x.shape, strict=True)
    ):
        raise ValueError(
            f"scale of shape {given_shape} does not broadcast to x of shape "
            f"{x.shape}: each axis must be 1, the axis size, or a divisor of it (groups)"
        )
    if spec.symmetric:
        if zero_point is not None:
            raise ValueError("zero_point must be None for a symmetric spec (its zero point is 0)")
        return scale, None
    if zero_point is None:
        raise ValueError("zero_point is required with scale for an affine spec (symmetric=False)")
    _check_zero_point_if_concrete(zero_point, spec)
    zero_point = jnp.asarray(zero_point)
    try:
        shape = np.broadcast_shapes(zero_point.shape, scale.shape)
    except ValueError:
        shape = None
    if shape != scale.shape:
        raise ValueError(
            f"zero_point of shape {zero_point.shape} does not broadcast to the scale's shape "
            f"{scale.shape}"
        )
    return scale, jnp.broadcast_to(zero_point, scale.shape)


def _check_quantize_args(x, spec, scale, zero_point, key):
    """Validates quantize's arguments; returns the given range in canonical form."""
    _check_finite_if_concrete(x, "x")
    if spec.rounding == "stochastic" and key is None:
        raise ValueError("key is required when rounding='stochastic'; pass key=jax.random.key(...)")
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without scale; give both or neither")
        scale_shape(x.shape, spec)
        return None, None
    return _check_given_range(x, spec, scale, zero_point)


@partial(jax.jit, static_argnums=1)
def _quantize(x, spec, scale, zero_point, key) -> QArray:
    if scale is None:
        scale, zero_point = _calibrate(x, spec)
    else:
        scale, zero_point = _given_range(scale, zero_point, spec)
        scale = _poison_non_finite(jax.lax.stop_gradient(x), scale)
    scale = jax.lax.stop_gradient(scale)
    noise = None
    if spec.rounding == "stochastic":
        noise = jax.random.uniform(key, x.shape, jnp.float32)
    full_zero = None if zero_point is None else _expand(zero_point, x.shape).astype(jnp.float32)
    q = _quantize_values(x.astype(jnp.float32), _expand(scale, x.shape), full_zero, spec, noise)
    return QArray(qvalue=q.astype(spec.dtype), scale=scale, zero_point=zero_point, spec=spec)


def quantize(
    x: ArrayLike,
    spec: QuantSpec,
    *,
    scale: ArrayLike | None = None,
    zero_point: ArrayLike | None = None,
    key: jax.Array | None = None,
) -> QArray:
    """Quantizes x to integers of `spec.dtype`.

    Args:
      x: array to quantize.
      spec: the quantizer.
      scale: a fixed scale (static ranges, learned steps); default: `calibrate`.
        Must have x's rank (or broadcast to it) with each axis 1, the axis
        size, or a divisor of it (a grouped axis).
      zero_point: the zero point that goes with `scale` (affine specs only).
      key: PRNG key, required when `spec.rounding == "stochastic"`.

    Returns:
      A `QArray` with q = clip(round(x / s) + z, qmin, qmax).

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([-1.0, 0.0, 0.3, 1.0]), QuantSpec(bits=4))
    >>> q.qvalue, q.scale
    (Array([-7,  0,  2,  7], dtype=int4), Array([0.14285715], dtype=float32))
    >>> dequantize(q)
    Array([-1.       ,  0.       ,  0.2857143,  1.       ], dtype=float32)
    """
    with _now_if_concrete(x, scale, zero_point, key):
        x = _as_float(x)
        scale, zero_point = _check_quantize_args(x, spec, scale, zero_point, key)
        return _quantize(x, spec, scale, zero_point, key)


@jax.jit
def _dequantize(q: QArray) -> jax.Array:
    values = q.qvalue.astype(jnp.float32)
    if q.zero_point is not None:
        values = values - _expand(q.zero_point, q.shape).astype(jnp.float32)
    return values * _expand(q.scale, q.shape)


def dequantize(q: QArray) -> jax.Array:
    """x_hat = (qvalue - zero_point) * scale, in float32.

    Args:
      q: a `QArray`.

    Returns:
      float32 array of shape q.shape.
    """
    with _now_if_concrete(q):
        return _dequantize(q)


@partial(jax.jit, static_argnums=1)
def _fake_quant(x, spec, scale, zero_point, key) -> jax.Array:
    given = scale is not None
    if given:
        scale, zero_point = _given_range(scale, zero_point, spec)
    else:
        scale, zero_point = _calibrate(x, spec)
    scale = jax.lax.stop_gradient(scale)
    full_scale = _expand(scale, x.shape)
    zero = 0.0 if zero_point is None else _expand(zero_point, x.shape).astype(jnp.float32)
    noise = None
    if spec.rounding == "stochastic":
        noise = jax.random.uniform(key, x.shape, jnp.float32)
    # The integers stay in float32 (exact for <= 16 bits): no round trip through
    # the integer dtype. Non-finite inputs give NaN, never a finite value.
    q = _quantize_values(
        x.astype(jnp.float32), full_scale, None if zero_point is None else zero, spec, noise
    )
    x_hat = jnp.where(jnp.isfinite(x), (q - zero) * full_scale, jnp.nan).astype(x.dtype)
    if not given and spec.calibration_method in ("absmax", "minmax"):
        # The range comes from max |x| or [min x, max x]: it holds every x (up to
        # rounding of the scale), so only an unsigned quantizer's 0 clips.
        if spec.signed or not spec.symmetric:
            return straight_through(x, x_hat)
        return clipped_straight_through(x, x_hat, 0.0, jnp.inf)
    lower = (spec.qmin - zero) * full_scale
    upper = (spec.qmax - zero) * full_scale
    return clipped_straight_through(x, x_hat, lower, upper)


def fake_quant(
    x: ArrayLike,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    scale: ArrayLike | None = None,
    zero_point: ArrayLike | None = None,
) -> jax.Array:
    """dequantize(quantize(x)) with a clipped straight-through gradient.

    Forward: x_hat = (clip(round(x / s) + z, qmin, qmax) - z) * s.
    Backward: d x_hat / d x = 1 where (qmin - z) s <= x <= (qmax - z) s, else 0.
    (A range calibrated by absmax / minmax holds every x, so there only an
    unsigned quantizer's lower bound 0 clips.) The scale is treated as a
    constant (no gradient through calibration).

    Args:
      x: array to fake-quantize.
      spec: the quantizer.
      key: PRNG key for stochastic rounding.
      scale, zero_point: a fixed range instead of calibrating on x.

    Returns:
      x_hat, same shape and dtype as x.
    """
    with _now_if_concrete(x, scale, zero_point, key):
        x = _as_float(x)
        scale, zero_point = _check_quantize_args(x, spec, scale, zero_point, key)
        return _fake_quant(x, spec, scale, zero_point, key)
