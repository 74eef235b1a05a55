"""How each library quantizes the same Linen model at the same bits.

Every library gets W<b>A<b>: symmetric signed integers, weights with one
absmax scale per output channel, the input activation of every Dense and Conv
quantized with one absmax range per tensor computed from the current batch
(dynamic), in the forward pass only (float gradients, straight-through
estimator where the library has one).

* kdq: `kdq.quant.apply_quantized(model, variables, x, recipe=quant_recipe(b))`
  on the unchanged `kdq.models` MLP / CNN (the recipe's weight rule selects
  every kernel, its activation rule every Dense / Conv input).
* Qwix (`qwix.QtProvider`, quantized training): `qwix.quantize_model` on the
  unchanged model with one `QtRule(module_path=".*", weight_qtype=int<b>,
  act_qtype=int<b>)`. Qwix's dynamic activation ranges are per example (its
  channelwise axes are the non-contracted ones); `_PerTensorActivations`
  turns them into one range per tensor for the activation operand (the left
  one of every Dense and Conv op) and leaves the weights per output channel.
* AQT (`aqt.jax.v2`): AQT injects its ops through the `dot_general_cls` /
  `conv_general_dilated_cls` attributes of `nn.Dense` / `nn.Conv`, so
  `AqtMLP` / `AqtCNN` restate kdq's MLP / CNN with those attributes set (same
  layers, names and parameter tree, checked by `aqt_model`). Dense layers use
  `AqtDotGeneral` with `aqt.jax.v2.config.dot_general_make(lhs_bits=b,
  rhs_bits=b, bwd_bits=None)` and a per-tensor activation range
  (`calib_shared_axes="per_tensor"`); Conv layers use `AqtConvGeneralDilated`
  with `conv_general_dilated_make(2, lhs_bits=b, rhs_bits=b)`, whose
  activation ranges AQT fixes per example. AQT's quantized conv casts to
  integers without a straight-through gradient, so neither the conv kernels
  nor anything before a quantized conv receives a gradient: with AQT the
  CNN's conv layers stay at their initial values during training.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
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


class _AqtLayers(nn.Module):
    """The AQT op injections shared by `AqtMLP` and `AqtCNN` (None: float ops)."""

    dense_config: Any = None
    conv_config: Any = None

    def dense(self, features: int) -> nn.Dense:
        cls = None
        if self.dense_config is not None:
            cls = functools.partial(aqt_flax.AqtDotGeneral, self.dense_config, prng_name=None)
        return nn.Dense(features, dot_general_cls=cls)

    def conv(self, features: int) -> nn.Conv:
        cls = None
        if self.conv_config is not None:
            cls = functools.partial(
                aqt_flax.AqtConvGeneralDilated, self.conv_config, prng_name=None
            )
        return nn.Conv(features, (3, 3), padding="SAME", conv_general_dilated_cls=cls)


class AqtMLP(_AqtLayers):
    """`kdq.models.small.MLP` with AQT's ops injected into its Dense layers."""

    num_classes: int = 10
    hidden: Sequence[int] = (64,)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(self.dense(width)(x))
        return self.dense(self.num_classes)(x)


class AqtCNN(_AqtLayers):
    """`kdq.models.small.CNN` with AQT's ops injected into its Conv and Dense layers."""

    num_classes: int = 10
    channels: Sequence[int] = (32, 64)
    dense_width: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        for width in self.channels:
            x = nn.relu(self.conv(width)(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self.dense(self.dense_width)(x))
        return self.dense(self.num_classes)(x)


def aqt_model(name: str, bits: int | None, example: jax.Array) -> nn.Module:
    """The AQT-injected restatement of `create_model(name, num_classes=10)`.

    Raises:
      ValueError: its parameter tree differs from the kdq model's.
    """
    dense, conv = (None, None) if bits is None else aqt_configs(bits)
    if name == "mlp":
        model = AqtMLP(dense_config=dense, conv_config=conv)
    elif name == "cnn":
        model = AqtCNN(dense_config=dense, conv_config=conv)
    else:
        raise ValueError(f"no AQT restatement of model {name!r}")
    reference = create_model(name, num_classes=10)
    key = jax.random.PRNGKey(0)
    expected = jax.eval_shape(reference.init, key, example)["params"]
    got = jax.eval_shape(model.init, key, example)
    if set(got) != {"params"} or jax.tree_util.tree_structure(
        got["params"]
    ) != jax.tree_util.tree_structure(expected):
        raise ValueError(f"the AQT {name} does not have the parameters of kdq's {name}")
    return model


def forward(library: str, name: str, bits: int | None, example: jax.Array) -> Forward:
    """`logits = f(params, images)` of kdq's model `name` quantized by `library`.

    Args:
      library: "kdq", "qwix" or "aqt"; any of them with bits None is the float model.
      name: "mlp" or "cnn" (`kdq.models.create_model(name, num_classes=10)`).
      bits: weight and activation bits, or None for float.
      example: an input batch (shapes only).
    """
    model = create_model(name, num_classes=10)
    if library == "aqt":
        injected = aqt_model(name, bits, example)
        return lambda params, x: injected.apply({"params": params}, x)
    if bits is None:
        return lambda params, x: model.apply({"params": params}, x)
    if library == "kdq":
        recipe = quant_recipe(bits)
        return lambda params, x: apply_quantized(model, {"params": params}, x, recipe=recipe)
    if library == "qwix":
        quantized = qwix_model(model, bits)
        return lambda params, x: quantized.apply({"params": params}, x)
    raise ValueError(f"unknown library {library!r}; known: {LIBRARIES}")
