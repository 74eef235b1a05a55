"""Real integer inference, and the quantized model it runs.

`to_quantized_model` turns float params + quantizer state + recipe into a
`QuantizedModel`: integer weights (`QArray`s of int8/int4...), float biases and
non-quantized params, and one static activation scale per quantized module
input. Two forward passes run it:

* `fake_quant_apply`: float arithmetic on dequantized weights and
  fake-quantized inputs (what QAT trains);
* `integer_apply`: modules with a quantized weight and a float input
  dequantize the weight on the fly, one group at a time (weight-only
  quantization, below); for each module with a quantized input *and* weight,
  integer operands into `jnp.einsum` / `lax.conv_general_dilated` with
  int32 accumulation, rescaled once in float32:

      y[r, n] = (sum_k q_x[r, k] q_w[k, n]) * (s_x[r] * s_w[n]) + b[n]

  s_x is one scale per tensor (static, LSQ, PACT), or, for dynamic
  activations, one per row r of the input (any axes but the contracted ones,
  e.g. per token of a (B, T, D) input with `QuantSpec(axes=(0, 1))`; for a
  convolution only per example, axes=(0,)). s_w is per tensor or per output
  channel (any kernel axes the module does not sum over), and for Dense,
  DenseGeneral and Einsum layers optionally per group: with the contracted
  kernel axis split into groups G of `group_size` (the spec's grouped axis,
  which must be one the module sums over), one int32 sum per group,

      y[r, n] = s_x[r] * sum_G s_w[G, n] * (sum_{k in G} q_x[r, k] q_w[k, n]) + b[n].

  Dense, DenseGeneral (any `axis`, `batch_dims`) and Einsum (any equation
  that is one contraction of input and kernel, batch labels included) run as
  the einsum of their `kdq.quant.contraction.contraction_layout`.

Weight-only layers (a quantized kernel, an input the recipe keeps float):
Dense, DenseGeneral and Einsum layers contract the float input with the
integer weights held as float32 values, one float32 sum per group, each
scaled once: y[r, n] = sum_G s_w[G, n] * (sum_{k in G} x[r, k] q_w[k, n]) + b[n].
A convolution runs on its dequantized kernel.

Input transforms (`QuantizedModel.input_transforms`, from rotations and
smoothing in `kdq.quant.layerwise`) apply to a Dense layer's input before
anything else, on both paths.

Operands, exactly. Integers are stored in the narrowest container of their
bits (`QuantSpec.dtype`: int4 for <= 4 bits, int8, int16), but the dot
products do not run on int4: both operands are widened to one common dtype,
int8 when both ranges fit in int8 (signed <= 8 bits, unsigned <= 7 bits),
otherwise int16 (so 4-bit weights are widened to int8, and unsigned 8-bit
activations, 0..255, make both operands int16). CPU / TPU accumulate in
int32. On GPUs, convolutions run on the same integer values held in float32
operands at full float32 precision, accumulated in float32; Dense,
DenseGeneral and Einsum layers use the integer dot with int32 accumulation.

Exactness. Before anything is compiled, each integer module is checked:
with K the number of products in one accumulator (the kernel's contracted
size: in_features for a Dense layer, the product of the contracted axes for
DenseGeneral / Einsum, group_size times the other contracted axes for
per-group weights, kh * kw * in_channels / groups for a convolution) and
m_x, m_w the largest |integer| of the input and weight
specs (2^(bits-1) signed, 2^bits - 1 unsigned), the worst-case sum
K * m_x * m_w must fit in int32 (<= 2^31 - 1; always true when
bits_x + bits_w + ceil(log2 K) <= 31); otherwise a ValueError names the
module. GPU float32 convolutions are exact while every partial sum stays
within 2^24: a convolution whose worst case exceeds it is computed in
slices of its input channels, each exact, summed in int32 (a grouped
convolution that cannot be sliced so raises a ValueError).

Agreement. Both compute the same real numbers; they differ only by float32
rounding. For one layer with K-term dot products,

      |y_int - y_fq| <= (K + 3) * eps * sum_k |x_hat[k] w_hat[k, n]|

(eps = 2^-23: the float sum's error bound gamma_K plus the rounding of the
rescale products), a few ulps of the output in practice. Through a deep
network such a difference can move a later input across a rounding boundary
of its quantizer, so logits then differ by up to one quantization step of
that layer; predictions agree (tested on the digits test set).

The integer path needs zero-point-free (symmetric) quantizers, activation
scales constant along the contraction (no activation groups), and weight
scales constant along it except for one grouped contracted axis (no groups
in a convolution); a Linen module's output keeps its `dtype` (float32 by
default). Anything else raises a ValueError naming the module (use
`fake_quant_apply`). A `QuantizedModel` always rounds to nearest:
stochastic rounding is a training-time option.
"""

from __future__ import annotations

import math
import string
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from kdq.quant.contraction import (
    CONTRACTION_MODULES,
    ContractionLayout,
    contraction_layout,
    weight_spec_problem,
)
from kdq.quant.intercept import SUPPORTED_MODULES, module_path, module_rules, module_state
from kdq.quant.numerics import dequantize, fake_quant, group_axis, quantize
from kdq.quant.qarray import QArray
from kdq.quant.recipe import QuantRecipe
from kdq.quant.spec import QuantSpec
from kdq.quant.transforms import transform_interceptor
from kdq.quant.tree import states_by_path, tree_specs

INT32_MAX = 2**31 - 1
# Every integer of magnitude <= 2^24 is a float32, so are sums that stay within it.
FLOAT32_EXACT = 2**24


@struct.dataclass
class QuantizedModel:
    """Everything integer inference needs, as one pytree.

    Attributes:
      params: the model's params with each quantized weight a `QArray`.
      act_scales: {module path...: {"scale": s}} nested by module path; empty
        when activations are float or quantized dynamically.
      recipe: the recipe (static).
      model_state: the model's other variable collections (e.g. BatchNorm
        statistics, applied in float after the integer conv), {} if none.
      input_transforms: {module path...: {"rotation_signs"?, "smoothing"?}},
        the input transform of each Dense layer whose weight was rotated or
        smoothed by post-training quantization (`kdq.quant.transforms`); {}
        if none.
    """

    params: Any
    act_scales: Any
    recipe: QuantRecipe = struct.field(pytree_node=False)
    model_state: Any = struct.field(default_factory=dict)
    input_transforms: Any = struct.field(default_factory=dict)


def _act_scales(quant_params: Any, recipe: QuantRecipe) -> Any:
    quantizer = recipe.act_quantizer
    if not quantizer.needs_calibration:
        return {}
    rules = module_rules(recipe.act_rules)
    scales = {
        path: quantizer.export(entry, rules.value(path), path)
        for path, entry in states_by_path(quant_params.get("activations")).items()
    }
    return flax.traverse_util.unflatten_dict(scales, sep="/")


def to_quantized_model(
    params: Any, recipe: QuantRecipe, quant_params: Any = None, *, model_state: Any = None
) -> QuantizedModel:
    """Converts float params + quantizer state into a `QuantizedModel`.

    Each weight and activation quantizer exports its state
    (`kdq.quant.quantizers`, `export`). Weights: calibrated mode quantizes
    with the spec's calibration; lsq mode uses the learned steps as scales.
    Activations: static ranges, LSQ steps (scale = step) and PACT clip
    values (scale = alpha / qmax) become static scales, computed as QAT
    computes them, so the integer levels are the trained ones; dynamic mode
    keeps none (scales are computed per batch). Stochastic rules round to nearest here (the
    model's recipe is `recipe.with_nearest_rounding()`).

    Args:
      params: float params.
      recipe: the quantization recipe.
      quant_params: quantizer state from `init_quant_params` / training.
      model_state: the model's non-param collections (BatchNorm statistics).

    Returns:
      The `QuantizedModel`.
    """
    quant_params = quant_params or {}
    recipe = recipe.with_nearest_rounding()
    quantizer = recipe.weight_quantizer
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    states = states_by_path(quant_params.get("weights"))
    for path, spec in tree_specs(params, recipe.weight_rules):
        if spec is not None:
            flat[path] = quantizer.export(flat[path], spec, states.get(path, {}), path)
    return QuantizedModel(
        params=flax.traverse_util.unflatten_dict(flat, sep="/"),
        act_scales=_act_scales(quant_params, recipe),
        recipe=recipe,
        model_state=dict(model_state or {}),
    )


def to_qat_state(qmodel: QuantizedModel) -> tuple[Any, dict[str, Any]]:
    """Float params and quantizer state that continue QAT from a `QuantizedModel`.

    The inverse of `to_quantized_model` (each quantizer's `from_export`):
    weights are dequantized; LSQ weight steps are the weight scales;
    activation state is rebuilt for the recipe's act_mode (static: the
    scales; lsq: step = scale; pact: alpha = scale * qmax; learned values as
    logarithms).
    `to_quantized_model(*to_qat_state(q))` gives back q's integers (scales
    equal up to float32 rounding of exp(log(s)), a relative 1e-6).

    Args:
      qmodel: a quantized model, e.g. from `kdq.checkpoint.restore_quantized`.

    Returns:
      (float params, quant_params) for `TrainState` / `apply_quantized`.

    Raises:
      ValueError: the model has input transforms (rotation, smoothing).
    """
    if jax.tree_util.tree_leaves(qmodel.input_transforms):
        raise ValueError(
            "this quantized model rotates or smooths the inputs of some layers "
            "(input_transforms), which QAT does not model; continue from the float model "
            "instead, or quantize it without rotation or scaling"
        )
    recipe = qmodel.recipe
    weights, acts = recipe.weight_quantizer, recipe.act_quantizer
    flat = flax.traverse_util.flatten_dict(
        qmodel.params, sep="/", is_leaf=lambda _, x: isinstance(x, QArray)
    )
    params, steps = {}, {}
    for path, leaf in flat.items():
        params[path] = leaf
        if isinstance(leaf, QArray):
            params[path] = dequantize(leaf)
            state = weights.from_export(leaf)
            if state is not None:
                steps[path] = state
    rules = module_rules(recipe.act_rules)
    activations = {
        path: acts.from_export(entry, rules.value(path))
        for path, entry in states_by_path(qmodel.act_scales).items()
    }
    unflatten = partial(flax.traverse_util.unflatten_dict, sep="/")
    quant_params = {"weights": unflatten(steps), "activations": unflatten(activations)}
    return unflatten(params), quant_params


def _input_scale(qmodel: QuantizedModel, path: str, x: jax.Array, spec: QuantSpec):
    """(scale, zero point) the quantized model quantizes module `path`'s input x with."""
    quantizer = qmodel.recipe.act_quantizer
    try:
        exported = module_state(quantizer, qmodel.act_scales, path)
    except ValueError:
        raise ValueError(
            f"the quantized model has no activation scale for module {path!r}"
        ) from None
    return quantizer.input_range(x, spec, exported)


def fake_quant_apply(model: nn.Module, qmodel: QuantizedModel, x: jax.Array, **kwargs) -> Any:
    """The float-arithmetic forward pass of a `QuantizedModel` (reference for the integer one).

    Args:
      model: the Linen model the quantized model was made from.
      qmodel: the quantized model.
      x: the model's input.
      **kwargs: passed to `model.apply`.

    Returns:
      The model's output computed with dequantized weights and inputs
      fake-quantized with the static (or per-batch) activation scales.
    """
    return _apply(model, qmodel, x, integer=False, **kwargs)


def _operand_dtype(*specs: QuantSpec) -> jnp.dtype:
    """int8 when every spec's range fits in int8 (signed <= 8, unsigned <= 7 bits), else int16."""
    fits_int8 = all(s.bits <= (8 if s.signed else 7) for s in specs)
    return jnp.dtype(jnp.int8 if fits_int8 else jnp.int16)


def _largest_level(spec: QuantSpec) -> int:
    """max |q| over the spec's integer range: 2^(bits-1) signed, 2^bits - 1 unsigned."""
    return max(-spec.qmin, spec.qmax)


def _float_convolutions() -> bool:
    """Whether integer convolutions run on float32 operands (GPU, see module docstring)."""
    return jax.default_backend() == "gpu"


def _channels_per_slice(module: nn.Module, kernel: QArray, act_spec: QuantSpec) -> int | None:
    """Input channels per exact float32 convolution slice; None when one convolution is exact.

    A slice of c channels sums kh * kw * c products of magnitude <= m_x * m_w;
    it is exact while that worst case stays within 2^24.
    """
    per_product = _largest_level(act_spec) * _largest_level(kernel.spec)
    exact_terms = FLOAT32_EXACT // per_product
    window = math.prod(kernel.shape[:-2])
    if window * kernel.shape[-2] <= exact_terms:
        return None
    return exact_terms // window


def _conv_problem(module: nn.Conv, kernel: QArray) -> str | None:
    """What the integer convolution cannot run: grouped or per-input weight scales, padding."""
    if kernel.spec.group_size is not None:
        return "per-group weight scales of a convolution"
    if any(d != 1 for d in kernel.scale.shape[:-1]):
        return (
            f"weight scales of shape {kernel.scale.shape} in a convolution (only per-tensor "
            "or per-output-channel)"
        )
    if isinstance(module.padding, str) and module.padding.upper() not in ("SAME", "VALID"):
        return f"Conv padding {module.padding!r} (only 'SAME', 'VALID' or explicit)"
    return None


def _unsupported(
    module: nn.Module,
    layout: ContractionLayout | None,
    x: jax.Array,
    act_spec: QuantSpec,
    kernel: QArray,
) -> str | None:
    """What the integer path cannot run in this module call, or None."""
    if not isinstance(module, SUPPORTED_MODULES):
        return f"{type(module).__name__} modules"
    if not act_spec.symmetric or not kernel.spec.symmetric:
        return "zero points (symmetric=False)"
    if act_spec.group_size is not None:
        return f"per-group activation scales (group_size={act_spec.group_size})"
    conv = isinstance(module, nn.Conv)
    contracted = set(range(1, x.ndim)) if conv else set(layout.input_contraction_axes)
    act_axes = {a % x.ndim for a in act_spec.axes}
    if act_axes & contracted:
        return (
            f"activation scales along axes {tuple(sorted(act_axes & contracted))} of the "
            f"{x.shape} input, which the module sums over (activation axes={act_spec.axes}); "
            "scales must be constant along the contraction: per tensor, per row of a dense "
            "layer's input (axes among those it does not sum over, e.g. per token), or per "
            "example of a convolution's input (axes=(0,))"
        )
    if conv:
        return _conv_problem(module, kernel)
    return weight_spec_problem(layout, kernel.shape, kernel.spec)


def _accumulated_terms(module: nn.Module, layout: ContractionLayout | None, kernel: QArray) -> int:
    """Products per int32 accumulator: the kernel's contraction size, or one group's share of it."""
    if isinstance(module, nn.Conv):
        return math.prod(kernel.shape[:-1])
    sizes = {a: kernel.shape[a] for a in layout.kernel_contraction_axes}
    grouped = group_axis(kernel.shape, kernel.spec)
    if grouped is not None:
        sizes[grouped] = kernel.spec.group_size
    return math.prod(sizes.values())


def _check_gpu_convolution(path: str, module: nn.Conv, kernel: QArray, act_spec: QuantSpec):
    """Raises if a GPU float32 convolution can be neither exact nor split into exact slices."""
    slices = _channels_per_slice(module, kernel, act_spec)
    if slices is None or (module.feature_group_count == 1 and slices > 0):
        return
    terms = math.prod(kernel.shape[:-1])
    m_x, m_w = _largest_level(act_spec), _largest_level(kernel.spec)
    reason = (
        f"a grouped convolution (feature_group_count={module.feature_group_count}) "
        "is not split into slices"
        if module.feature_group_count != 1
        else f"even one input channel's {math.prod(kernel.shape[:-2])} products exceed it"
    )
    raise ValueError(
        f"module {path!r}: the GPU float32 convolution is exact only while its sums "
        f"stay within 2^24, but K={terms} products of |q_x| <= {m_x} and "
        f"|q_w| <= {m_w} can reach {terms * m_x * m_w}, and {reason}; use fewer "
        "bits for this layer, or fake_quant_apply"
    )


def _check_integer_ready(
    path: str,
    module: nn.Module,
    layout: ContractionLayout | None,
    x: jax.Array,
    act_spec: QuantSpec,
    kernel: QArray,
):
    """Raises a ValueError naming the module if the integer path cannot run it exactly."""
    problem = _unsupported(module, layout, x, act_spec, kernel)
    if problem:
        raise ValueError(
            f"the integer path does not support {problem} (module {path!r}); "
            "use fake_quant_apply, or change the recipe"
        )
    terms = _accumulated_terms(module, layout, kernel)
    per_group = "" if kernel.spec.group_size is None else " (one weight group)"
    m_x, m_w = _largest_level(act_spec), _largest_level(kernel.spec)
    if terms * m_x * m_w > INT32_MAX:
        raise ValueError(
            f"module {path!r}: its int32 accumulator can overflow: K={terms} products"
            f"{per_group} of |q_x| <= {m_x} ({act_spec.bits}-bit "
            f"{'signed' if act_spec.signed else 'unsigned'} inputs) and |q_w| <= {m_w} "
            f"({kernel.spec.bits}-bit weights) can sum to {terms * m_x * m_w} > 2^31 - 1; use "
            "fewer bits for this layer (bits_x + bits_w + ceil(log2 K) <= 31 always fits), "
            "a smaller group_size, or fake_quant_apply"
        )
    if isinstance(module, nn.Conv) and _float_convolutions():
        _check_gpu_convolution(path, module, kernel, act_spec)


def _conv_padding(padding: Any, spatial: int) -> str | list[tuple[int, int]]:
    """Linen Conv padding ('SAME', 'VALID', int, or (low, high) pairs) in lax's form."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * spatial
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _convolve(
    module: nn.Conv, lhs: jax.Array, rhs: jax.Array, accumulator_dtype, precision=None
) -> jax.Array:
    """`module`'s convolution (strides, padding, dilations, groups) of lhs by kernel rhs."""
    spatial = lhs.ndim - 2
    strides = module.strides or 1
    strides = (strides,) * spatial if isinstance(strides, int) else tuple(strides)

    def dilation(value):
        value = value or 1
        return (value,) * spatial if isinstance(value, int) else tuple(value)

    numbers = lax.ConvDimensionNumbers(
        lhs_spec=(0, spatial + 1, *range(1, spatial + 1)),
        rhs_spec=(spatial + 1, spatial, *range(spatial)),
        out_spec=(0, spatial + 1, *range(1, spatial + 1)),
    )
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=strides,
        padding=_conv_padding(module.padding, spatial),
        lhs_dilation=dilation(module.input_dilation),
        rhs_dilation=dilation(module.kernel_dilation),
        dimension_numbers=numbers,
        feature_group_count=module.feature_group_count,
        preferred_element_type=accumulator_dtype,
        precision=precision,
    )


def _integer_conv(module: nn.Conv, q_x: jax.Array, q_w: jax.Array, slice_channels: int | None):
    """The int32 accumulator of an integer convolution.

    CPU / TPU: the integer operands, accumulated in int32. GPU: the integer
    values held in float32 operands (full float32 precision, no TF32),
    accumulated in float32, which is exact while every partial sum stays
    within 2^24; wider convolutions run in slices of `slice_channels` input
    channels, each exact, converted to int32 and summed. XLA's cuDNN int8
    convolutions return float32 only, and in our tests on an H200 they gave
    wrong sums (twice the exact ones in a ResNet-8), so kdq does not use them.
    """

    def conv(lhs, rhs, accumulator_dtype, precision=None):
        return _convolve(module, lhs, rhs, accumulator_dtype, precision)

    if not _float_convolutions():
        return conv(q_x, q_w, jnp.int32)
    q_x, q_w = q_x.astype(jnp.float32), q_w.astype(jnp.float32)
    channels = q_x.shape[-1]
    step = channels if slice_channels is None else slice_channels
    accumulator = None
    for start in range(0, channels, step):
        part = conv(
            q_x[..., start : start + step],
            q_w[..., start : start + step, :],
            jnp.float32,
            lax.Precision.HIGHEST,
        ).astype(jnp.int32)
        accumulator = part if accumulator is None else accumulator + part
    return accumulator


def _aligned(values: jax.Array, labels: str, target: str) -> jax.Array:
    """Per-axis values (one axis per label) arranged to broadcast against `target`'s axes.

    Axes whose label is not in `target` must have size 1 (constant along the
    contraction); they are dropped. One value in all: a scalar.
    """
    values = jnp.asarray(values, jnp.float32)
    if values.size == 1:
        return values.reshape(())
    values = values.reshape((1,) * (len(labels) - values.ndim) + values.shape)
    kept = [c for c in labels if c in target]
    values = values.reshape([n for c, n in zip(labels, values.shape, strict=True) if c in target])
    order = sorted(range(len(kept)), key=lambda i: target.index(kept[i]))
    sizes = {kept[i]: values.shape[i] for i in order}
    return jnp.transpose(values, order).reshape([sizes.get(c, 1) for c in target])


def _split_groups(
    layout: ContractionLayout, q_x: jax.Array, q_w: jax.Array, axis: int, groups: int
) -> tuple[ContractionLayout, jax.Array, jax.Array, str]:
    """The contraction with kernel axis `axis` split into (groups, group_size).

    The group label becomes a batch label at the end of the output, so one
    einsum gives an accumulator per group.

    Returns:
      (layout of the grouped contraction, q_x and q_w reshaped, labels of the
      weight scale: the kernel's with the grouped axis labelled by its group).
    """
    label = layout.kernel_labels[axis]
    used = layout.input_labels + layout.kernel_labels
    group, within = [c for c in string.ascii_letters if c not in used][:2]

    def split(q, position):
        return q.reshape(q.shape[:position] + (groups, -1) + q.shape[position + 1 :])

    q_x = split(q_x, layout.input_labels.index(label))
    q_w = split(q_w, axis)
    grouped = ContractionLayout(
        layout.input_labels.replace(label, group + within),
        layout.kernel_labels.replace(label, group + within),
        layout.output_labels + group,
    )
    return grouped, q_x, q_w, layout.kernel_labels.replace(label, group)


def _integer_contraction(
    layout: ContractionLayout,
    q_x: jax.Array,
    kernel: QArray,
    x_scale: jax.Array,
    *,
    accumulator: jnp.dtype = jnp.int32,
) -> jax.Array:
    """y = s_x s_w sum_k q_x q_w, or s_x sum_G s_w[G] sum_{k in G} q_x q_w.

    The sums are int32 for integer operands; `accumulator=jnp.float32` sums
    float operands (a float input times the integer weights).
    """
    q_w = kernel.qvalue.astype(q_x.dtype)
    output = layout.output_labels
    x_scale = _aligned(x_scale, layout.input_labels, output)
    grouped = group_axis(kernel.shape, kernel.spec)
    if grouped is None:
        sums = jnp.einsum(layout.equation, q_x, q_w, preferred_element_type=accumulator)
        w_scale = _aligned(kernel.scale, layout.kernel_labels, output)
        return sums.astype(jnp.float32) * (x_scale * w_scale)
    groups = kernel.scale.shape[grouped]
    split, q_x, q_w, scale_labels = _split_groups(layout, q_x, q_w, grouped, groups)
    sums = jnp.einsum(split.equation, q_x, q_w, preferred_element_type=accumulator)
    w_scale = _aligned(kernel.scale, scale_labels, split.output_labels)
    return jnp.sum(sums.astype(jnp.float32) * w_scale, axis=-1) * x_scale


def _integer_convolution(module: nn.Conv, q_x: jax.Array, kernel: QArray, x_scale, act_spec):
    """y = s_x s_w conv(q_x, q_w), the int32 convolution rescaled once."""
    slices = None
    if module.feature_group_count == 1:
        slices = _channels_per_slice(module, kernel, act_spec)
    accumulator = _integer_conv(module, q_x, kernel.qvalue.astype(q_x.dtype), slices)
    w_scale = kernel.scale.reshape(kernel.scale.shape[-1:])
    # Per tensor: a scalar. Per example: shape (B, 1, ..., 1).
    x_scale = jnp.asarray(x_scale, jnp.float32)
    if x_scale.size == 1:
        x_scale = x_scale.reshape(())
    y = accumulator.astype(jnp.float32) * (x_scale * w_scale)
    if module.use_bias:
        y = y + module.get_variable("params", "bias")
    return y


def _integer_module(
    module: nn.Module,
    layout: ContractionLayout | None,
    x: jax.Array,
    kernel: QArray,
    x_scale: jax.Array,
    act_spec: QuantSpec,
) -> jax.Array:
    """The module's output from integer operands, in the module's dtype (float32 by default)."""
    dtype = _operand_dtype(act_spec, kernel.spec)
    q_x = quantize(x, act_spec, scale=x_scale).qvalue.astype(dtype)
    if isinstance(module, nn.Conv):
        y = _integer_convolution(module, q_x, kernel, x_scale, act_spec)
    else:
        y = _integer_contraction(layout, q_x, kernel, x_scale)
        if module.use_bias:
            bias = module.get_variable("params", "bias")
            y = y + _aligned(bias, layout.bias_labels, layout.output_labels)
    return y if module.dtype is None else y.astype(module.dtype)


def _call_layout(path: str, module: nn.Module, args, call_kwargs) -> ContractionLayout | None:
    """The contraction of a non-convolution module call (None for a convolution)."""
    if isinstance(module, nn.Conv) or not isinstance(module, CONTRACTION_MODULES):
        return None
    einsum_str = call_kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    try:
        return contraction_layout(module, args[0].shape, einsum_str)
    except ValueError as error:
        raise ValueError(
            f"the integer path cannot run module {path!r}: {error}; use fake_quant_apply"
        ) from None


def integer_apply(model: nn.Module, qmodel: QuantizedModel, x: jax.Array, **kwargs) -> Any:
    """The integer forward pass of a `QuantizedModel` (see module docstring).

    Modules with both a quantized input and a `QArray` kernel run on
    integers; every other op runs in float on dequantized weights.

    Args:
      model: the Linen model the quantized model was made from.
      qmodel: the quantized model.
      x: the model's input.
      **kwargs: passed to `model.apply`.

    Returns:
      The model's output.
    """
    return _apply(model, qmodel, x, integer=True, **kwargs)


def _weight_only_module(
    module: nn.Module, layout: ContractionLayout | None, x: jax.Array, kernel: QArray
) -> jax.Array:
    """A module with integer weights and a float input: weights dequantized on the fly.

    Dense, DenseGeneral and Einsum layers contract the float input with the
    integer weights as float32 values, one sum per weight group, and scale
    each sum once:

        y[r, n] = sum_G s_w[G, n] * (sum_{k in G} x[r, k] q_w[k, n]) + b[n]

    (a single group without `group_size`), so no float copy of the whole
    kernel is formed. A convolution, or a weight spec whose scales are not
    constant along the contraction, runs on the dequantized kernel.
    """
    if isinstance(module, nn.Conv) or weight_spec_problem(layout, kernel.shape, kernel.spec):
        weight = dequantize(kernel).astype(x.dtype)
        if isinstance(module, nn.Conv):
            y = _convolve(module, x, weight, jnp.float32)
        else:
            y = jnp.einsum(layout.equation, x, weight, preferred_element_type=jnp.float32)
    else:
        y = _integer_contraction(
            layout, x.astype(jnp.float32), kernel, jnp.float32(1.0), accumulator=jnp.float32
        )
    if module.use_bias:
        bias = module.get_variable("params", "bias")
        y = y + (
            bias if layout is None else _aligned(bias, layout.bias_labels, layout.output_labels)
        )
    return y if module.dtype is None else y.astype(module.dtype)


def _quantized_kernel_modules(flat: dict[str, Any]) -> set[str]:
    """Paths of the modules whose kernel is a `QArray`."""
    return {
        key.rsplit("/", 1)[0] if "/" in key else ""
        for key, leaf in flat.items()
        if key.endswith("kernel") and isinstance(leaf, QArray)
    }


def _apply(model: nn.Module, qmodel: QuantizedModel, x: jax.Array, *, integer: bool, **kwargs):
    """Runs `model` on a `QuantizedModel`.

    Every Dense layer with an input transform sees its transformed input
    first (`kdq.quant.transforms`). On the integer path, modules with a
    quantized input and weight run on integers and modules with only a
    quantized weight dequantize it on the fly; otherwise weights are
    dequantized and inputs fake-quantized.
    """
    rules = module_rules(qmodel.recipe.act_rules)
    flat = flax.traverse_util.flatten_dict(
        qmodel.params, sep="/", is_leaf=lambda _, x: isinstance(x, QArray)
    )
    kept = _quantized_kernel_modules(flat) if integer else set()
    params = {
        key: leaf
        if key.rsplit("/", 1)[0] in kept or not isinstance(leaf, QArray)
        else dequantize(leaf)
        for key, leaf in flat.items()
    }
    params = flax.traverse_util.unflatten_dict(params, sep="/")

    def interceptor(next_fun, args, call_kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, SUPPORTED_MODULES):
            return next_fun(*args, **call_kwargs)
        module, path = context.module, module_path(context.module)
        spec = rules.value(path) if args else None
        if path in kept:
            kernel = module.get_variable("params", "kernel")
            layout = _call_layout(path, module, args, call_kwargs)
            if spec is None:
                return _weight_only_module(module, layout, args[0], kernel)
            _check_integer_ready(path, module, layout, args[0], spec, kernel)
            scale, _ = _input_scale(qmodel, path, args[0], spec)
            return _integer_module(module, layout, args[0], kernel, scale, spec)
        if spec is None:
            return next_fun(*args, **call_kwargs)
        scale, zero_point = _input_scale(qmodel, path, args[0], spec)
        x_hat = fake_quant(args[0], spec, scale=scale, zero_point=zero_point)
        return next_fun(x_hat, *args[1:], **call_kwargs)

    with nn.intercept_methods(transform_interceptor(qmodel.input_transforms)):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": params, **qmodel.model_state}, x, **kwargs)
