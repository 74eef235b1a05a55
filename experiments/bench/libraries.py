"""How each library quantizes the same Linen model at the same bits.

Every library gets W<b>A<b>: symmetric signed integers, one absmax scale per
output channel for the weights and one absmax range per tensor, from the
current batch (dynamic), for the input of every Dense and Conv; forward pass
only (float gradients, straight-through where the library has one).

* kdq: `apply_quantized(model, variables, x, recipe=quant_recipe(b))` on the
  unchanged `kdq.models` MLP / CNN.
* Qwix: `qwix.quantize_model` (quantized training, `QtProvider`) with one
  `QtRule(module_path=".*", weight_qtype=int<b>, act_qtype=int<b>)`; its
  dynamic activation ranges, per example by default, are made per tensor
  (`_PerTensorActivations`).
* AQT (`aqt.jax.v2`): `aqt_intercept` sets the `dot_general_cls` /
  `conv_general_dilated_cls` of every `nn.Dense` / `nn.Conv` to
  `AqtDotGeneral(dot_general_make(lhs_bits=b, rhs_bits=b, bwd_bits=None))`
  with per-tensor activation ranges / `AqtConvGeneralDilated(
  conv_general_dilated_make(2, lhs_bits=b, rhs_bits=b))`, whose activation
  ranges AQT fixes per example, while the unchanged model runs. AQT's
  quantized conv casts to integers without a straight-through gradient, so
  with AQT the CNN's conv layers get no gradient and keep their initial values.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax

from experiments.bench.common import quant_recipe
from kdq.models import create_model
from kdq.quant import apply_quantized

LIBRARIES = ("kdq", "qwix", "aqt")
Forward = Callable[[Any, jax.Array], jax.Array]


class _PerTensorActivations(qwix.QtProvider):
    """Qwix quantized training with one dynamic range per activation tensor."""

    def _create_dot_general_qt_config(self, rule, op_id, lhs, rhs):
        config = super()._create_dot_general_qt_config(rule, op_id, lhs, rhs)
        return dataclasses.replace(config, lhs_disable_channelwise_axes=True)

    def _create_conv_general_qt_config(self, rule, op_id, lhs, rhs):
        config = super()._create_conv_general_qt_config(rule, op_id, lhs, rhs)
        return dataclasses.replace(config, lhs_disable_channelwise_axes=True)


def qwix_model(model: nn.Module, bits: int) -> nn.Module:
    """`model` with Qwix's quantized-training interception at W<bits>A<bits>."""
    qtype = jnp.dtype(f"int{bits}")
    rule = qwix.QtRule(module_path=".*", weight_qtype=qtype, act_qtype=qtype)
    return qwix.quantize_model(model, _PerTensorActivations([rule]))


def aqt_configs(bits: int) -> tuple[Any, Any]:
    """AQT's configurations of a quantized Dense op and a quantized Conv op."""
    dense = aqt_config.dot_general_make(lhs_bits=bits, rhs_bits=bits, bwd_bits=None)
    dense.fwd.dg_quantizer.lhs.calib_shared_axes = "per_tensor"
    conv = aqt_config.default_unquantized_config()
    conv.fwd = aqt_config.conv_general_dilated_make(2, lhs_bits=bits, rhs_bits=bits)
    return dense, conv


def aqt_intercept(bits: int):
    """A `flax.linen.intercept_methods` interceptor running every Dense / Conv with AQT's ops.

    The layer is called as a copy of itself, on its own scope (its variables),
    with its op class attribute set to AQT's op at W<bits>A<bits>.
    """
    dense, conv = aqt_configs(bits)
    ops = {
        nn.Dense: ("dot_general_cls", aqt_flax.AqtDotGeneral, dense),
        nn.Conv: ("conv_general_dilated_cls", aqt_flax.AqtConvGeneralDilated, conv),
    }

    def interceptor(next_fun, args, kwargs, context):
        layer = context.module
        attribute, op, config = ops.get(type(layer), (None, None, None))
        if context.method_name != "__call__" or op is None or getattr(layer, attribute) is not None:
            return next_fun(*args, **kwargs)
        op = functools.partial(op, config, prng_name=None)
        return layer.clone(parent=layer.scope, **{attribute: op})(*args, **kwargs)

    return interceptor


def forward(library: str, name: str, bits: int | None) -> Forward:
    """`logits = f(params, images)` of `create_model(name, num_classes=10)` quantized by `library`.

    `library` is "kdq", "qwix" or "aqt" (with `bits` None: the float model);
    `name` a model of `kdq.models`.
    """
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; known: {LIBRARIES}")
    model = create_model(name, num_classes=10)
    if bits is None:
        return lambda params, x: model.apply({"params": params}, x)
    if library == "kdq":
        recipe = quant_recipe(bits)
        return lambda params, x: apply_quantized(model, {"params": params}, x, recipe=recipe)
    if library == "qwix":
        quantized = qwix_model(model, bits)
        return lambda params, x: quantized.apply({"params": params}, x)
    interceptor = aqt_intercept(bits)

    def aqt_forward(params, x):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": params}, x)

    return aqt_forward
