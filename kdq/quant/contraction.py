"""Which axes a Dense, DenseGeneral or Einsum module sums over, and the weight specs that fit.

Each of these modules computes one contraction y = x . w of its input x and
its kernel w, written here as an explicit einsum equation with one label per
axis ("x,w->y"):

  * contraction labels are in x and w, not in y: y sums over them;
  * batch labels are in x, w and y; free labels in one operand and y.

      nn.Dense(N) on x (B, T, K):          "abk,kn->abn"
      nn.DenseGeneral(features, axis, batch_dims): w is (*batch, *contracted, *features)
      nn.Einsum(shape, equation):          the equation (ellipses resolved)

Weight scales factor out of the sum only if they are constant along it:

    y[r, n] = sum_k x[r, k] w[k, n] s_w[n] = s_w[n] sum_k x[r, k] w[k, n]

so a weight spec (`QuantSpec`) fits the module when its `axes` (the axes
with their own scale) avoid the kernel's contraction axes, and, with
`group_size`, its grouped axis (the last axis not in `axes`, see
`kdq.quant.numerics.group_axis`) is a contraction axis: per group G of that
axis, y = sum_G s_w[G] sum_{k in G} x[k] w[k]. Keeping every other kernel
axis, `QuantSpec(axes=layout.kernel_output_axes, group_size=g)` groups the
last contraction axis.

>>> layout = contraction_layout(nn.DenseGeneral((4, 8), axis=(-2, -1)), (2, 3, 6, 5))
>>> layout.equation, layout.kernel_contraction_axes, layout.kernel_output_axes
('abcd,cdef->abef', (0, 1), (2, 3))
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import flax.linen as nn
from opt_einsum.parser import parse_einsum_input

from kdq.quant.numerics import group_axis
from kdq.quant.spec import QuantSpec

CONTRACTION_MODULES = (nn.Dense, nn.DenseGeneral, nn.Einsum)


@dataclasses.dataclass(frozen=True)
class ContractionLayout:
    """The einsum labels of a module's input, kernel and output axes.

    Attributes:
      input_labels: one label per input axis.
      kernel_labels: one label per kernel axis.
      output_labels: one label per output axis, in the module's output order.
    """

    input_labels: str
    kernel_labels: str
    output_labels: str

    @property
    def equation(self) -> str:
        """ "input,kernel->output", for `jnp.einsum`."""
        return f"{self.input_labels},{self.kernel_labels}->{self.output_labels}"

    @property
    def contracted_labels(self) -> str:
        """The labels summed over, in kernel order."""
        return "".join(c for c in self.kernel_labels if c not in self.output_labels)

    @property
    def kernel_contraction_axes(self) -> tuple[int, ...]:
        """Kernel axes the module sums over."""
        return tuple(self.kernel_labels.index(c) for c in self.contracted_labels)

    @property
    def kernel_output_axes(self) -> tuple[int, ...]:
        """Kernel axes that reach the output (batch and output-feature axes)."""
        return tuple(a for a, c in enumerate(self.kernel_labels) if c in self.output_labels)

    @property
    def input_contraction_axes(self) -> tuple[int, ...]:
        """Input axes the module sums over."""
        return tuple(self.input_labels.index(c) for c in self.contracted_labels)

    @property
    def bias_labels(self) -> str:
        """Labels of a bias: the output labels the kernel has, in output order (as flax)."""
        return "".join(c for c in self.output_labels if c in self.kernel_labels)


def describe_module(module: nn.Module) -> str:
    """'module <path>' of a bound module, else its class (for error messages).

    Args:
      module: a Linen module.

    Returns:
      e.g. "module 'block_0/attn/q'" or "an unbound Einsum".
    """
    if module.scope is None:
        return f"an unbound {type(module).__name__}"
    return f"module {'/'.join(module.path)!r}"


def _as_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def _dense_general_layout(module: nn.DenseGeneral, ndim: int) -> ContractionLayout:
    """flax's DenseGeneral: dot_general over `axis`, batch over `batch_dims`."""
    letters = string.ascii_letters
    axis = tuple(a % ndim for a in _as_tuple(module.axis))
    batch = tuple(a % ndim for a in _as_tuple(module.batch_dims))
    features = letters[ndim : ndim + len(_as_tuple(module.features))]
    x = letters[:ndim]
    free = "".join(x[a] for a in range(ndim) if a not in axis and a not in batch)
    batch_labels = "".join(x[a] for a in batch)
    kernel = batch_labels + "".join(x[a] for a in axis) + features
    return ContractionLayout(x, kernel, batch_labels + free + features)


def _einsum_problem(inputs: str, kernel: str, output: str, kernel_ndim: int) -> str | None:
    """What an Einsum equation does that is not one contraction of input and kernel."""
    if len(kernel) != kernel_ndim:
        return f"kernel labels {kernel!r} for a kernel of {kernel_ndim} axes"
    for name, labels in (("input", inputs), ("kernel", kernel), ("output", output)):
        if len(set(labels)) != len(labels):
            return f"a repeated {name} label in {labels!r} (a diagonal or trace)"
    for name, own, other in (("input", inputs, kernel), ("kernel", kernel, inputs)):
        alone = [c for c in own if c not in other and c not in output]
        if alone:
            return f"{name} axes {alone} summed within the {name} alone"
    return None


def _einsum_layout(module: nn.Einsum, input_shape, einsum_str: str | None) -> ContractionLayout:
    """The module's equation with ellipses replaced by labels (opt_einsum's parser)."""
    equation = einsum_str if einsum_str is not None else module.einsum_str
    if not isinstance(equation, str) or "->" not in equation or equation.count(",") != 1:
        raise ValueError(
            f"{describe_module(module)}: an Einsum needs an explicit two-operand equation "
            f"'input,kernel->output', got {equation!r}"
        )
    try:
        operands, output, _ = parse_einsum_input(
            (equation.replace(" ", ""), tuple(input_shape), tuple(module.shape)), shapes=True
        )
    except ValueError as error:
        raise ValueError(
            f"{describe_module(module)}: cannot read its equation {equation!r}: {error}"
        ) from None
    inputs, kernel = operands.split(",")
    problem = _einsum_problem(inputs, kernel, output, len(module.shape))
    if problem:
        raise ValueError(
            f"{describe_module(module)}: its equation {equation!r} has {problem}; only one "
            "contraction of input and kernel is supported"
        )
    return ContractionLayout(inputs, kernel, output)


def contraction_layout(
    module: nn.Module, input_shape: Sequence[int], einsum_str: str | None = None
) -> ContractionLayout:
    """The contraction a Dense, DenseGeneral or Einsum module computes on inputs of `input_shape`.

    Args:
      module: an `nn.Dense`, `nn.DenseGeneral` or `nn.Einsum`.
      input_shape: shape of the module's input.
      einsum_str: an Einsum's equation when it is passed at call time
        (default: `module.einsum_str`).

    Returns:
      Its `ContractionLayout`.

    Raises:
      ValueError: another module type, or an Einsum equation that is not one
        contraction of input and kernel (repeated labels, or an axis summed
        within one operand alone), naming the module.
    """
    ndim = len(input_shape)
    if isinstance(module, nn.Einsum):
        return _einsum_layout(module, input_shape, einsum_str)
    if isinstance(module, nn.DenseGeneral):
        return _dense_general_layout(module, ndim)
    if isinstance(module, nn.Dense):
        x = string.ascii_letters[:ndim]
        out = string.ascii_letters[ndim]
        return ContractionLayout(x, x[-1] + out, x[:-1] + out)
    raise ValueError(
        f"{describe_module(module)}: a {type(module).__name__} is not a contraction module "
        "(Dense, DenseGeneral or Einsum)"
    )


def weight_spec_problem(
    layout: ContractionLayout, kernel_shape: Sequence[int], spec: QuantSpec
) -> str | None:
    """Why `spec`'s weight scales do not factor out of the module's sum, or None.

    Args:
      layout: the module's `ContractionLayout`.
      kernel_shape: shape of its kernel.
      spec: the weight spec.

    Returns:
      A description of the problem (the axes involved and a spec that fits), or None.
    """
    kernel_shape = tuple(kernel_shape)
    grouped = group_axis(kernel_shape, spec)  # validates spec.axes against the kernel
    contracted = layout.kernel_contraction_axes
    fitting = f"e.g. axes={layout.kernel_output_axes}"
    kept = sorted({a % len(kernel_shape) for a in spec.axes} & set(contracted))
    if kept:
        return (
            f"weight scales along kernel axes {tuple(kept)} (axes={spec.axes}), which the "
            f"module sums over (its kernel's contraction axes are {contracted}); keep only "
            f"output axes, {fitting}, and split the contraction with group_size"
        )
    if grouped is not None and grouped not in contracted:
        remedy = (
            f"keep every output axis, {fitting}, to group along axis {contracted[-1]}"
            if contracted
            else "drop group_size"
        )
        return (
            f"weight groups along kernel axis {grouped} (the last axis not in axes="
            f"{spec.axes}), which is not one the module sums over (its kernel's contraction "
            f"axes are {contracted}); {remedy}"
        )
    return None


def check_weight_spec(
    module: nn.Module, layout: ContractionLayout, kernel_shape: Sequence[int], spec: QuantSpec
) -> None:
    """Raises a ValueError naming `module` if `spec`'s scales vary along its contraction.

    Args:
      module: the module the kernel belongs to (named in the error).
      layout: its `contraction_layout`.
      kernel_shape: shape of its kernel.
      spec: the weight spec.

    Raises:
      ValueError: `spec.axes` keeps a scale along a contraction axis, or its
        grouped axis is not a contraction axis (see the module docstring).
    """
    problem = weight_spec_problem(layout, kernel_shape, spec)
    if problem:
        raise ValueError(f"{describe_module(module)}: {problem}")
