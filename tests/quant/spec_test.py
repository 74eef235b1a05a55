"""QuantSpec: value semantics, integer ranges, and rejection of bad arguments."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import QuantSpec, calibrate, fake_quant, quantize, scale_shape

X = np.arange(12, dtype=np.float32).reshape(3, 4) - 5


# --------------------------------------------------------------------- value semantics


def test_spec_is_frozen():
    spec = QuantSpec(bits=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8


def test_spec_is_keyword_only():
    with pytest.raises(TypeError):
        QuantSpec(4)  # type: ignore[misc]


def test_spec_is_hashable_and_compares_by_value():
    a = QuantSpec(bits=4, axes=[-1], calibration="percentile,99.9")
    b = QuantSpec(bits=4, axes=(-1,), calibration="percentile,99.9")
    assert a == b and hash(a) == hash(b)
    assert a.axes == (-1,) and isinstance(a.axes, tuple)
    assert QuantSpec(bits=np.int64(4)) == QuantSpec(bits=4)
    assert len({a, b, QuantSpec(bits=8)}) == 2
    assert {a: 1}[b] == 1


def test_spec_is_a_jit_static_argument():
    traces = []

    def f(x, spec):
        traces.append(spec)
        return fake_quant(x, spec)

    jf = jax.jit(f, static_argnames="spec")
    jf(X, QuantSpec(bits=4))
    jf(X + 1, QuantSpec(bits=4))  # equal spec: no retrace
    assert len(traces) == 1
    jf(X, QuantSpec(bits=8))
    assert len(traces) == 2
    jp = jax.jit(f, static_argnums=1)
    jp(X, QuantSpec(bits=4, axes=(0,)))
    assert len(traces) == 3


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16])
def test_integer_ranges_and_storage_dtypes(bits):
    width = 4 if bits <= 4 else 8 if bits <= 8 else 16
    unsigned = QuantSpec(bits=bits, signed=False)
    assert (unsigned.qmin, unsigned.qmax) == (0, 2**bits - 1)
    assert jnp.dtype(unsigned.dtype).name == f"uint{width}"
    signed = QuantSpec(bits=bits, symmetric=bits > 1)
    assert (signed.qmin, signed.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert jnp.dtype(signed.dtype).name == f"int{width}"


def test_calibration_parsing():
    assert QuantSpec(calibration="percentile,99.9").percentile == 99.9
    assert QuantSpec(calibration="percentile,99.9").calibration_method == "percentile"
    assert QuantSpec(calibration="percentile,100").percentile == 100.0
    assert QuantSpec(calibration="mse").percentile is None
    for method in ("absmax", "minmax", "mse"):
        assert QuantSpec(calibration=method).calibration_method == method
    defaults = QuantSpec()
    assert (defaults.bits, defaults.signed, defaults.symmetric) == (8, True, True)
    assert (defaults.axes, defaults.group_size) == ((), None)
    assert (defaults.calibration, defaults.rounding) == ("absmax", "nearest")


# ------------------------------------------------------------------------ bad input


def _value(text: str) -> str:
    return re.escape(text)


@pytest.mark.parametrize("bits", [0, 17, -1, 4.5, True, "8"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits.*" + _value(f"bits={bits!r}")):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("axes", [(0, 0), (-1, -1)])
def test_repeated_axes(axes):
    with pytest.raises(ValueError, match=r"axes.*" + _value(f"axes={axes!r}")):
        QuantSpec(axes=axes)


@pytest.mark.parametrize("axes", [-1, (0.5,), (True,), "0"])
def test_axes_not_a_tuple_of_ints(axes):
    with pytest.raises(ValueError, match=r"axes.*" + _value(f"axes={axes!r}")):
        QuantSpec(axes=axes)


@pytest.mark.parametrize("axes", [(2,), (-3,), (0, 5)])
@pytest.mark.parametrize("fn", ["scale_shape", "calibrate", "quantize", "fake_quant"])
def test_axes_out_of_range(axes, fn):
    spec = QuantSpec(axes=axes)
    pattern = _value(f"axes={axes}") + r".*out of range.*" + _value("(3, 4)")
    with pytest.raises(ValueError, match=pattern):
        if fn == "scale_shape":
            scale_shape(X.shape, spec)
        else:
            {"calibrate": calibrate, "quantize": quantize, "fake_quant": fake_quant}[fn](X, spec)


@pytest.mark.parametrize("axes", [(0, -2), (-1, 1)])
def test_axes_repeated_after_normalisation(axes):
    spec = QuantSpec(axes=axes)  # distinct as written
    with pytest.raises(ValueError, match=_value(f"axes={axes}") + r".*same axis twice"):
        quantize(X, spec)
    with pytest.raises(ValueError, match=_value(f"axes={axes}") + r".*same axis twice"):
        scale_shape((3, 4), spec)


@pytest.mark.parametrize("group_size", [0, -2, 2.0, True])
def test_bad_group_size_type_or_value(group_size):
    with pytest.raises(ValueError, match=r"group_size.*" + _value(f"group_size={group_size!r}")):
        QuantSpec(group_size=group_size)


def test_group_size_not_dividing_the_axis():
    # contraction axis of a (3, 4) array with axes=() is axis 1 (size 4)
    with pytest.raises(ValueError, match=r"group_size=3 does not divide axis 1 of size 4"):
        quantize(X, QuantSpec(group_size=3))
    # with axes=(-1,) it is axis 0 (size 3)
    with pytest.raises(ValueError, match=r"group_size=2 does not divide axis 0 of size 3"):
        fake_quant(X, QuantSpec(group_size=2, axes=(-1,)))


def test_group_size_with_no_axis_to_group():
    with pytest.raises(ValueError, match=r"group_size=2 needs an axis to group.*axes=\(0, 1\)"):
        quantize(X, QuantSpec(group_size=2, axes=(0, 1)))
    with pytest.raises(ValueError, match=r"group_size=1 needs an axis to group"):
        scale_shape((), QuantSpec(group_size=1))


@pytest.mark.parametrize("calibration", ["max", "minmax ", "Absmax", "", "mse,3", 99])
def test_unknown_calibration(calibration):
    with pytest.raises(ValueError, match=r"calibration.*" + _value(f"calibration={calibration!r}")):
        QuantSpec(calibration=calibration)


@pytest.mark.parametrize("rounding", ["floor", "Nearest", "", None])
def test_unknown_rounding(rounding):
    with pytest.raises(ValueError, match=r"rounding.*" + _value(f"rounding={rounding!r}")):
        QuantSpec(rounding=rounding)


@pytest.mark.parametrize(
    "calibration",
    [
        "percentile,0",
        "percentile,100.5",
        "percentile,-5",
        "percentile,abc",
        "percentile,",
        "percentile",
        "percentile,nan",
        "percentile,inf",
    ],
)
def test_bad_percentile(calibration):
    with pytest.raises(ValueError, match=r"percentile.*" + _value(f"calibration={calibration!r}")):
        QuantSpec(calibration=calibration)


@pytest.mark.parametrize("fn", ["quantize", "fake_quant"])
def test_stochastic_rounding_without_key(fn):
    spec = QuantSpec(rounding="stochastic")
    with pytest.raises(ValueError, match=r"key is required.*rounding='stochastic'"):
        {"quantize": quantize, "fake_quant": fake_quant}[fn](X, spec)


@pytest.mark.parametrize("shape", [(2, 4), (3, 3), (1, 1, 4), (6, 1)])
def test_given_scale_that_does_not_broadcast(shape):
    pattern = r"scale of shape " + _value(str(shape)) + r" does not broadcast to x of shape "
    with pytest.raises(ValueError, match=pattern + _value("(3, 4)")):
        quantize(X, QuantSpec(), scale=np.ones(shape, np.float32))
    with pytest.raises(ValueError, match=pattern):
        fake_quant(X, QuantSpec(), scale=np.ones(shape, np.float32))


def test_given_scale_of_lower_rank_that_does_not_broadcast():
    """The message must name the shape that was passed, (3,), not a reshaped (1, 3)."""
    with pytest.raises(ValueError, match=r"scale of shape \(3,\) does not broadcast.*\(3, 4\)"):
        quantize(X, QuantSpec(), scale=np.ones(3, np.float32))


@pytest.mark.parametrize("shape", [(), (1,), (4,), (1, 4), (3, 1), (3, 2), (3, 4)])
def test_given_scale_shapes_that_broadcast(shape):
    q = quantize(X, QuantSpec(), scale=np.full(shape, 0.5, np.float32))
    np.testing.assert_array_equal(np.asarray(q.qvalue), np.round(X / 0.5))


@pytest.mark.parametrize("field", ["signed", "symmetric"])
@pytest.mark.parametrize("value", ["yes", "False", 1, 0, 1.0, None, np.int64(1), (True,)])
def test_signed_and_symmetric_must_be_bools(field, value):
    """A truthy string like "False" used to be accepted (and mean True)."""
    pattern = rf"{field} must be a bool \(True or False\), got " + _value(f"{field}={value!r}")
    with pytest.raises(ValueError, match=pattern):
        QuantSpec(bits=4, **{field: value})


def test_numpy_scalars_are_stored_as_python_values():
    spec = QuantSpec(
        bits=np.int32(4),
        signed=np.bool_(False),
        symmetric=np.bool_(True),
        axes=(np.int64(-1),),
        group_size=np.int16(2),
    )
    assert spec == QuantSpec(bits=4, signed=False, axes=(-1,), group_size=2)
    assert hash(spec) == hash(QuantSpec(bits=4, signed=False, axes=(-1,), group_size=2))
    for name, kind in (("bits", int), ("signed", bool), ("symmetric", bool), ("group_size", int)):
        assert type(getattr(spec, name)) is kind, name
    assert all(type(a) is int for a in spec.axes)
    assert (spec.qmin, spec.qmax) == (0, 15)


@pytest.mark.parametrize("bits", [np.bool_(True), np.float32(8), None, [8]])
def test_bits_of_other_types(bits):
    with pytest.raises(
        ValueError, match=r"bits must be an integer in 1\.\.16, got " + _value(f"bits={bits!r}")
    ):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("axes", ["", (np.bool_(True),), None, 0.0])
def test_axes_of_other_types(axes):
    """An empty string used to pass as "no axes" (per-tensor)."""
    with pytest.raises(
        ValueError, match=r"axes must be a tuple of ints, got " + _value(f"axes={axes!r}")
    ):
        QuantSpec(axes=axes)


@pytest.mark.parametrize("group_size", [np.bool_(True), "4", 4.0, np.float64(2)])
def test_group_size_of_other_types(group_size):
    with pytest.raises(ValueError, match=r"group_size.*" + _value(f"group_size={group_size!r}")):
        QuantSpec(group_size=group_size)


@pytest.mark.parametrize("rounding", [["nearest"], 0, b"nearest"])
def test_rounding_of_other_types(rounding):
    with pytest.raises(
        ValueError, match=r"rounding must be one of.*" + _value(f"rounding={rounding!r}")
    ):
        QuantSpec(rounding=rounding)
