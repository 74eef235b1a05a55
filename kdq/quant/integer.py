"""Real integer inference, and the quantized model it runs.

`to_quantized_model` turns float params + quantizer state + recipe into a
`QuantizedModel`: integer weights (`QArray`s of int8/int4...), float biases and
non-quantized params, and one static activation scale per quantized module
input. Two forward passes run it:

* `fake_quant_apply`: float arithmetic on dequantized weights and
  fake-quantized inputs (what QAT trains);
* `integer_apply`: for each module with a quantized input *and* weight,
  integer operands into `lax.dot_general` / `lax.conv_general_dilated` with
  int32 accumulation, rescaled once in float32:

      y = (sum_k q_x[k] q_w[k, n]) * (s_x * s_w[n]) + b[n]

Agreement. Both compute the same real numbers; they differ only by float32
rounding. For one layer with K-term dot products,

      |y_int - y_fq| <= (K + 3) * eps * sum_k |x_hat[k] w_hat[k, n]|

(eps = 2^-23: the float sum's error bound gamma_K plus the rounding of the
rescale products), a few ulps of the output in practice. Through a deep
network such a difference can move a later input across a rounding boundary
of its quantizer, so logits then differ by up to one quantization step of
that layer; predictions agree (tested on the digits test set).

Integer operands are int8 when both ranges fit in int8 (signed <= 8 bits,
unsigned <= 7 bits), otherwise int16. On GPUs, convolutions run on the
integer values in float32 operands (exact; see `_conv_operands`). The integer path needs zero-point-free
(symmetric) quantizers and per-tensor or per-output-channel weight scales;
anything else raises a ValueError saying so (use `fake_quant_apply`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from kdq.quant.intercept import (
    SUPPORTED_MODULES,
    _compiled,
    _match,
    lookup,
    module_input_interceptor,
)
from kdq.quant.numerics import calibrate, dequantize, fake_quant, quantize
from kdq.quant.qarray import QArray
from kdq.quant.recipe import QuantRecipe
from kdq.quant.spec import QuantSpec
from kdq.quant.tree import tree_specs


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
    """

    params: Any
    act_scales: Any
    recipe: QuantRecipe = struct.field(pytree_node=False)
    model_state: Any = struct.field(default_factory=dict)


def _act_scales(quant_params: Any, recipe: QuantRecipe) -> Any:
    state = flax.traverse_util.flatten_dict(quant_params.get("activations", {}), sep="/")
    scales = {}
    compiled = _compiled(recipe.act_rules)
    for key, value in state.items():
        path, field = key.rsplit("/", 1)
        _, spec = _match(path, compiled)
        if field == "scale":
            scales[f"{path}/scale"] = value
            if f"{path}/zero_point" in state:
                scales[f"{path}/zero_point"] = state[f"{path}/zero_point"]
        elif field == "step":
            scales[f"{path}/scale"] = value
        elif field == "alpha":
            scales[f"{path}/scale"] = value / spec.qmax
    return flax.traverse_util.unflatten_dict(scales, sep="/")


def to_quantized_model(
    params: Any, recipe: QuantRecipe, quant_params: Any = None, *, model_state: Any = None
) -> QuantizedModel:
    """Converts float params + quantizer state into a `QuantizedModel`.

    Weights: calibrated mode quantizes with the spec's calibration; lsq mode
    uses the learned steps as scales. Activations: static ranges, LSQ steps
    (scale = step) and PACT clip values (scale = alpha / qmax) become static
    scales; dynamic mode keeps none (scales are computed per batch).

    Args:
      params: float params.
      recipe: the quantization recipe.
      quant_params: quantizer state from `init_quant_params` / training.
      model_state: the model's non-param collections (BatchNorm statistics).

    Returns:
      The `QuantizedModel`.
    """
    quant_params = quant_params or {}
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    steps = flax.traverse_util.flatten_dict(quant_params.get("weights", {}), sep="/")
    for path, spec in tree_specs(params, recipe.weight_rules):
        if spec is None:
            continue
        if recipe.weight_mode == "lsq":
            flat[path] = quantize(flat[path], spec, scale=steps[f"{path}/step"])
        else:
            flat[path] = quantize(flat[path], spec)
    return QuantizedModel(
        params=flax.traverse_util.unflatten_dict(flat, sep="/"),
        act_scales=_act_scales(quant_params, recipe) if recipe.act_mode != "dynamic" else {},
        recipe=recipe,
        model_state=dict(model_state or {}),
    )


def to_qat_state(qmodel: QuantizedModel) -> tuple[Any, dict[str, Any]]:
    """Float params and quantizer state that continue QAT from a `QuantizedModel`.

    The inverse of `to_quantized_model`: weights are dequantized; LSQ weight
    steps are the weight scales; activation state is rebuilt for the recipe's
    act_mode (static: the scales; lsq: step = scale; pact: alpha = scale *
    qmax). `to_quantized_model(*to_qat_state(q))` gives back q's integers.

    Args:
      qmodel: a quantized model, e.g. from `kdq.checkpoint.restore_quantized`.

    Returns:
      (float params, quant_params) for `TrainState` / `apply_quantized`.
    """
    recipe = qmodel.recipe
    flat = flax.traverse_util.flatten_dict(
        qmodel.params, sep="/", is_leaf=lambda _, x: isinstance(x, QArray)
    )
    params, steps = {}, {}
    for path, leaf in flat.items():
        if isinstance(leaf, QArray):
            params[path] = dequantize(leaf)
            if recipe.weight_mode == "lsq":
                steps[f"{path}/step"] = leaf.scale
        else:
            params[path] = leaf
    activations = {}
    compiled = _compiled(recipe.act_rules)
    for key, value in flax.traverse_util.flatten_dict(qmodel.act_scales, sep="/").items():
        path, field = key.rsplit("/", 1)
        if recipe.act_mode == "lsq" and field == "scale":
            activations[f"{path}/step"] = value
        elif recipe.act_mode == "pact" and field == "scale":
            activations[f"{path}/alpha"] = value * _match(path, compiled)[1].qmax
        else:
            activations[key] = value
    unflatten = partial(flax.traverse_util.unflatten_dict, sep="/")
    quant_params = {"weights": unflatten(steps), "activations": unflatten(activations)}
    return unflatten(params), quant_params


def _input_scale(qmodel: QuantizedModel, path: str, x: jax.Array, spec: QuantSpec):
    if qmodel.recipe.act_mode == "dynamic":
        return calibrate(x, spec)
    try:
        state = lookup(qmodel.act_scales, path)
    except (KeyError, TypeError):
        raise ValueError(
            f"the quantized model has no activation scale for module {path!r}"
        ) from None
    return state["scale"], state.get("zero_point")


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
    fits_int8 = all(s.bits <= (8 if s.signed else 7) for s in specs)
    return jnp.dtype(jnp.int8 if fits_int8 else jnp.int16)


def _check_integer_ready(path: str, module: nn.Module, act_spec: QuantSpec, kernel: QArray):
    problem = None
    if not act_spec.symmetric or not kernel.spec.symmetric:
        problem = "zero points (symmetric=False)"
    elif kernel.spec.group_size is not None:
        problem = "per-group weight scales"
    elif any(d != 1 for d in kernel.scale.shape[:-1]):
        problem = (
            f"weight scales of shape {kernel.scale.shape} (only per-tensor or per-output-channel)"
        )
    elif isinstance(module, nn.Einsum):
        problem = "Einsum modules"
    elif isinstance(module, nn.DenseGeneral) and (
        module.axis not in (-1, (-1,)) or module.batch_dims
    ):
        problem = "DenseGeneral contracting other axes than the last"
    elif (
        isinstance(module, nn.Conv)
        and isinstance(module.padding, str)
        and (module.padding.upper() not in ("SAME", "VALID"))
    ):
        problem = f"Conv padding {module.padding!r} (only 'SAME', 'VALID' or explicit)"
    elif not isinstance(module, SUPPORTED_MODULES):
        problem = f"{type(module).__name__} modules"
    if problem:
        raise ValueError(
            f"the integer path does not support {problem} (module {path!r}); "
            "use fake_quant_apply, or change the recipe"
        )


def _conv_operands(q_x: jax.Array, q_w: jax.Array):
    """Operands and accumulator dtype of an integer convolution on this backend.

    CPU / TPU: the integer operands, accumulated in int32. GPU: the integer
    values held in float32 operands, accumulated in float32, which is exact
    while every partial sum stays below 2^24 (int8 x int8 products: fewer than
    1024 terms). XLA's cuDNN int8 convolutions return float32 only, and in
    our tests on an H200 they gave wrong sums (twice the exact ones in a
    ResNet-8), so kdq does not use them.
    """
    if jax.default_backend() == "gpu":
        return q_x.astype(jnp.float32), q_w.astype(jnp.float32), jnp.float32
    return q_x, q_w, jnp.int32


def _conv_padding(padding: Any, spatial: int) -> str | list[tuple[int, int]]:
    """Linen Conv padding ('SAME', 'VALID', int, or (low, high) pairs) in lax's form."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * spatial
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _integer_module(module: nn.Module, x: jax.Array, kernel: QArray, x_scale: jax.Array, act_spec):
    dtype = _operand_dtype(act_spec, kernel.spec)
    q_x = quantize(x, act_spec, scale=x_scale).qvalue.astype(dtype)
    q_w = kernel.qvalue.astype(dtype)
    if isinstance(module, nn.Conv):
        spatial = x.ndim - 2
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
        q_x, q_w, accumulator_dtype = _conv_operands(q_x, q_w)
        accumulator = lax.conv_general_dilated(
            q_x,
            q_w,
            window_strides=strides,
            padding=_conv_padding(module.padding, spatial),
            lhs_dilation=dilation(module.input_dilation),
            rhs_dilation=dilation(module.kernel_dilation),
            dimension_numbers=numbers,
            feature_group_count=module.feature_group_count,
            preferred_element_type=accumulator_dtype,
        )
    else:
        accumulator = lax.dot_general(
            q_x,
            q_w,
            (((x.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=jnp.int32,
        )
    w_scale = kernel.scale.reshape(kernel.scale.shape[-1:])
    y = accumulator.astype(jnp.float32) * (jnp.reshape(x_scale, ()) * w_scale)
    if module.use_bias:
        y = y + module.get_variable("params", "bias")
    return y


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


def _apply(model: nn.Module, qmodel: QuantizedModel, x: jax.Array, *, integer: bool, **kwargs):
    """Runs `model` on a `QuantizedModel`: integer or fake-quantized selected modules."""
    compiled = _compiled(qmodel.recipe.act_rules)
    flat = flax.traverse_util.flatten_dict(
        qmodel.params, sep="/", is_leaf=lambda _, x: isinstance(x, QArray)
    )
    integer_modules = set()
    if integer:
        for key, leaf in flat.items():
            path = key.rsplit("/", 1)[0] if "/" in key else ""
            if key.endswith("kernel") and isinstance(leaf, QArray) and _match(path, compiled)[1]:
                integer_modules.add(path)
    params = {
        key: leaf
        if key.rsplit("/", 1)[0] in integer_modules or not isinstance(leaf, QArray)
        else dequantize(leaf)
        for key, leaf in flat.items()
    }
    params = flax.traverse_util.unflatten_dict(params, sep="/")

    def call(next_fun, args, call_kwargs, module, path, spec):
        scale, zero_point = _input_scale(qmodel, path, args[0], spec)
        if path not in integer_modules:
            x_hat = fake_quant(args[0], spec, scale=scale, zero_point=zero_point)
            return next_fun(x_hat, *args[1:], **call_kwargs)
        kernel = module.get_variable("params", "kernel")
        _check_integer_ready(path, module, spec, kernel)
        return _integer_module(module, args[0], kernel, scale, spec)

    with nn.intercept_methods(module_input_interceptor(qmodel.recipe.act_rules, call)):
        return model.apply({"params": params, **qmodel.model_state}, x, **kwargs)
