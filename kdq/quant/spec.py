"""`QuantSpec`: the static description of one uniform integer quantizer.

A spec is frozen and hashable, so it can be a static argument under `jax.jit`
and a `pytree_node=False` field of a pytree. Everything that depends only on
the spec (integer range, storage dtype, parsed calibration) lives here;
everything that depends on an array lives in `kdq.quant.numerics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

CALIBRATIONS = ("absmax", "minmax", "percentile,<p>", "mse")
ROUNDINGS = ("nearest", "stochastic")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize an array to `bits`-bit integers.

    Integer range (`qmin`, `qmax`):
      signed:   [-2^(bits-1), 2^(bits-1) - 1]
      unsigned: [0, 2^bits - 1]

    Symmetric (`symmetric=True`, zero point 0): q = clip(round(x / s), qmin, qmax)
    with s = bound / qmax, where `bound` is the calibration statistic of |x|
    (signed) or of max(x, 0) (unsigned). A signed symmetric quantizer needs
    bits >= 2 (with one bit, qmax = 0 and no positive level exists).

    Affine (`symmetric=False`): q = clip(round(x / s) + z, qmin, qmax), with the
    range [lo, hi] widened to contain 0 (so 0.0 is exactly representable),
    s = (hi - lo) / (qmax - qmin) and zero point z = qmin - round(lo / s).

    Attributes:
      bits: integer width, 1..16.
      signed: signed (two's complement) or unsigned integers.
      symmetric: zero point fixed at 0 (True) or calibrated (False).
      axes: axes that keep their own scale; all other axes are reduced.
        `()` is per-tensor, `(-1,)` per output channel of a Dense kernel
        `(in, out)` or a Conv kernel `(..., in, out)`.
      group_size: split the grouped axis into groups of this many elements,
        each with its own scale (sub-channel quantization). The grouped axis
        is the last axis not in `axes` (`kdq.quant.group_axis`): the
        contraction axis of a Dense or Conv kernel with axes=(-1,); for a
        DenseGeneral or Einsum kernel, keep its output axes
        (`kdq.quant.contraction_layout(...).kernel_output_axes`) to group
        its last contracted axis.
      calibration: how the range is chosen from the data:
        "absmax" (max |x|, or [-max|x|, max|x|] when affine), "minmax"
        ([min x, max x]), "percentile,<p>" (p-th percentile of |x|, or the
        [min(p, 100-p), max(p, 100-p)] percentiles when affine, 0 < p <= 100), "mse" (the clipping
        ratio r in {0.01, 0.02, ..., 1.00} of the full range (max |x| when
        symmetric, [min x, max x] when affine) minimising the squared
        reconstruction error, per scale group).
      rounding: "nearest" (round half to even) or "stochastic"
        (floor(x / s + u), u ~ U[0, 1): unbiased; needs a PRNG key).

    Every field is type-checked on construction (a `ValueError` names the
    field and the value): numpy integers and bools are accepted and stored as
    Python `int` / `bool`, so equal specs hash equally whatever their origin.

    >>> spec = QuantSpec(bits=4, axes=(-1,))
    >>> spec.qmin, spec.qmax, spec.dtype
    (-8, 7, dtype(int4))
    >>> QuantSpec(bits=8, signed=False).qmax
    255
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axes: tuple[int, ...] = ()
    group_size: int | None = None
    calibration: str = "absmax"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool | np.bool_) or not isinstance(self.bits, int | np.integer):
            raise ValueError(
                f"bits must be an integer in 1..16, got bits={self.bits!r} "
                f"({type(self.bits).__name__})"
            )
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be in 1..16, got bits={self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))
        for name in ("signed", "symmetric"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise ValueError(
                    f"{name} must be a bool (True or False), got {name}={value!r} "
                    f"({type(value).__name__})"
                )
            object.__setattr__(self, name, bool(value))
        if self.signed and self.symmetric and self.bits < 2:
            raise ValueError(
                f"bits={self.bits} with signed=True, symmetric=True has no positive level; "
                "use bits >= 2, signed=False or symmetric=False"
            )
        if (
            isinstance(self.axes, str)
            or not isinstance(self.axes, Sequence)
            or not all(
                isinstance(a, int | np.integer) and not isinstance(a, bool | np.bool_)
                for a in self.axes
            )
        ):
            raise ValueError(f"axes must be a tuple of ints, got axes={self.axes!r}")
        object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(f"axes must not repeat an axis, got axes={self.axes!r}")
        if self.group_size is not None:
            if (
                isinstance(self.group_size, bool | np.bool_)
                or not isinstance(self.group_size, int | np.integer)
                or self.group_size < 1
            ):
                raise ValueError(
                    f"group_size must be a positive int or None, got group_size={self.group_size!r}"
                )
            object.__setattr__(self, "group_size", int(self.group_size))
        _parse_calibration(self.calibration)
        if not isinstance(self.rounding, str) or self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got rounding={self.rounding!r}")

    @property
    def qmin(self) -> int:
        """Smallest representable integer."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest representable integer."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def dtype(self) -> jnp.dtype:
        """Narrowest integer storage dtype: (u)int4, (u)int8 or (u)int16."""
        width = 4 if self.bits <= 4 else 8 if self.bits <= 8 else 16
        return jnp.dtype(f"{'' if self.signed else 'u'}int{width}")

    @property
    def percentile(self) -> float | None:
        """The p of a "percentile,<p>" calibration, else None."""
        return _parse_calibration(self.calibration)[1]

    @property
    def calibration_method(self) -> str:
        """ "absmax", "minmax", "percentile" or "mse"."""
        return _parse_calibration(self.calibration)[0]


def _parse_calibration(calibration: str) -> tuple[str, float | None]:
    """Splits "percentile,99.9" into ("percentile", 99.9); validates the rest."""
    if not isinstance(calibration, str):
        raise ValueError(
            f"calibration must be one of {CALIBRATIONS}, got calibration={calibration!r}"
        )
    if calibration in ("absmax", "minmax", "mse"):
        return calibration, None
    method, _, value = calibration.partition(",")
    if method == "percentile":
        try:
            p = float(value)
        except ValueError:
            raise ValueError(
                f"calibration 'percentile,<p>' needs a number p, got calibration={calibration!r}"
            ) from None
        if not 0.0 < p <= 100.0:
            raise ValueError(
                f"percentile must be in (0, 100], got calibration={calibration!r} (p={p})"
            )
        return method, p
    raise ValueError(f"calibration must be one of {CALIBRATIONS}, got calibration={calibration!r}")
