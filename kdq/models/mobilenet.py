"""MobileNetV2 and MobileNetV3 (small, large) as in torchvision's `models/mobilenetv2.py` / `mobilenetv3.py`.

MobileNetV2 (Sandler et al. 2018): a 3x3 stride-2 stem, 17 inverted residual
blocks (1x1 expand -> 3x3 depthwise -> 1x1 linear projection, ReLU6), a 1x1
conv to 1280 channels, global average pool, dropout, dense classifier.

MobileNetV3 (Howard et al. 2019): the same block shape with 3x3 or 5x5
depthwise kernels, optional squeeze-excitation (ReLU, hard-sigmoid) and ReLU
or hard-swish activations per torchvision's configuration tables; a 1x1 conv
to 6x the last block's channels, pool, dense -> hard-swish -> dropout -> dense.

Channel counts are scaled by `width_mult` and rounded with `make_divisible(.., 8)`.
Batch norm uses the zoo's PyTorch defaults (momentum 0.1, epsilon 1e-5);
torchvision trains MobileNetV3 with momentum 0.01 and epsilon 1e-3.

Blocks are grouped into stages of equal resolution: a stage starts at the
first block and at every stride-2 block. Submodule paths (feature taps):
"stem"; "stage1" .. "stage5" (MobileNetV2, MobileNetV3-large) or "stage4"
(MobileNetV3-small), each holding "block_0", "block_1", ...; "head" (the last
1x1 conv); "pre_logits" (MobileNetV3 only); "fc".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdq.models.layers import ConvBN, Dtype, classifier, conv, global_avg_pool

Activation = Callable[[jax.Array], jax.Array]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds `value` to the nearest multiple of `divisor`, losing at most 10%.

    Args:
      value: a channel count, possibly scaled by a width multiplier.
      divisor: the multiple to round to.

    Returns:
      The rounded channel count, at least `divisor`.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class BlockConfig(NamedTuple):
    """One inverted residual block.

    Attributes:
      kernel_size: depthwise kernel size.
      expanded: channels of the expansion (no expansion when equal to the input's).
      features: output channels.
      strides: depthwise stride.
      use_se: add squeeze-excitation after the depthwise conv.
      activation: activation of the expansion and depthwise convs.
    """

    kernel_size: int
    expanded: int
    features: int
    strides: int
    use_se: bool
    activation: Activation


class SqueezeExcitation(nn.Module):
    """Global pool -> 1x1 conv -> ReLU -> 1x1 conv -> hard-sigmoid, scaling the input's channels.

    Attributes:
      squeeze: channels of the bottleneck.
      dtype: computation dtype.
    """

    squeeze: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps (B, H, W, C) to (B, H, W, C)."""
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = nn.relu(conv(self.squeeze, 1, use_bias=True, dtype=self.dtype, name="fc1")(scale))
        scale = conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name="fc2")(scale)
        return x * nn.hard_sigmoid(scale)


class InvertedResidual(nn.Module):
    """Expand ("expand") -> depthwise ("depthwise") -> [SE ("se")] -> project ("project"), plus identity.

    The residual connection is used when the block keeps the stride and channel count.

    Attributes:
      config: the block's kernel, channels, stride, SE and activation.
      dtype: computation dtype.
    """

    config: BlockConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, features)."""
        cfg = self.config
        # The expansion and the depthwise conv both give `cfg.expanded` channels.
        expanded = functools.partial(
            ConvBN, cfg.expanded, activation=cfg.activation, dtype=self.dtype
        )
        y = x
        if cfg.expanded != x.shape[-1]:
            y = expanded(1, name="expand")(y, train)
        y = expanded(cfg.kernel_size, strides=cfg.strides, groups=cfg.expanded, name="depthwise")(
            y, train
        )
        if cfg.use_se:
            y = SqueezeExcitation(make_divisible(cfg.expanded // 4), dtype=self.dtype, name="se")(y)
        y = ConvBN(cfg.features, 1, activation=None, dtype=self.dtype, name="project")(y, train)
        if cfg.strides == 1 and x.shape[-1] == cfg.features:
            y = y + x
        return y


class MobileStage(nn.Module):
    """Inverted residual blocks "block_0", "block_1", ... in sequence.

    Attributes:
      configs: one `BlockConfig` per block.
      dtype: computation dtype.
    """

    configs: Sequence[BlockConfig]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps (B, H, W, C) to the last block's output."""
        for i, cfg in enumerate(self.configs):
            x = InvertedResidual(cfg, dtype=self.dtype, name=f"block_{i}")(x, train)
        return x


def _features(
    x: jax.Array,
    blocks: Sequence[BlockConfig],
    *,
    stem: int,
    head: int,
    activation: Activation,
    train: bool,
    dtype: Dtype,
) -> jax.Array:
    """The trunk: "stem" (3x3, stride 2) -> "stage1", "stage2", ... -> "head" (1x1 conv).

    The stem and head convs use `activation`; a stage starts at the first block
    and before every stride-2 block.
    """
    x = ConvBN(stem, 3, strides=2, activation=activation, dtype=dtype, name="stem")(x, train)
    stages: list[list[BlockConfig]] = []
    for cfg in blocks:
        if not stages or cfg.strides != 1:
            stages.append([])
        stages[-1].append(cfg)
    for i, configs in enumerate(stages):
        x = MobileStage(tuple(configs), dtype=dtype, name=f"stage{i + 1}")(x, train)
    return ConvBN(head, 1, activation=activation, dtype=dtype, name="head")(x, train)


class _MobileNet(nn.Module):
    """The options of MobileNetV2 and MobileNetV3.

    Attributes:
      num_classes: number of output logits.
      width_mult: multiplier of every channel count (MobileNetV2's last conv
        keeps at least 1280 channels).
      dropout: dropout rate before the classifier (torchvision: 0.2; needs a
        "dropout" rng when training with a rate above 0).
      dtype: computation dtype (e.g. jnp.bfloat16); params stay float32.
    """

    num_classes: int
    width_mult: float = 1.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32


class MobileNetV2(_MobileNet):
    """torchvision's MobileNetV2 (attributes: see `_MobileNet`)."""

    # (expand ratio t, channels c, repeats n, first stride s), from the paper's Table 2.
    setting: ClassVar[tuple[tuple[int, int, int, int], ...]] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images (B, H, W, C) to logits (B, num_classes)."""
        stem = channels = make_divisible(32 * self.width_mult)
        blocks = []
        for t, c, n, s in self.setting:
            features = make_divisible(c * self.width_mult)
            for i in range(n):
                expanded = int(round(channels * t))
                blocks.append(
                    BlockConfig(3, expanded, features, s if i == 0 else 1, False, nn.relu6)
                )
                channels = features
        last = make_divisible(1280 * max(1.0, self.width_mult))
        x = _features(
            x, blocks, stem=stem, head=last, activation=nn.relu6, train=train, dtype=self.dtype
        )
        x = nn.Dropout(self.dropout, deterministic=not train)(global_avg_pool(x))
        return classifier(x, self.num_classes, dtype=self.dtype)


_RE, _HS = nn.relu, nn.hard_swish


class MobileNetV3(_MobileNet):
    """torchvision's MobileNetV3; `MobileNetV3Large` and `MobileNetV3Small` set the tables.

    Attributes: see `_MobileNet`.
    """

    # (kernel, expanded, out, use_se, activation, stride) per block, before width scaling.
    setting: ClassVar[tuple[tuple[int, int, int, bool, Activation, int], ...]] = ()
    # Width of the hidden dense layer of the classifier, before width scaling.
    last_channel: ClassVar[int] = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images (B, H, W, C) to logits (B, num_classes)."""
        if not self.setting:
            raise ValueError("use MobileNetV3Large or MobileNetV3Small")
        blocks = [
            BlockConfig(
                k,
                make_divisible(e * self.width_mult),
                make_divisible(c * self.width_mult),
                s,
                se,
                act,
            )
            for k, e, c, se, act, s in self.setting
        ]
        x = _features(
            x,
            blocks,
            stem=make_divisible(16 * self.width_mult),
            head=6 * blocks[-1].features,
            activation=nn.hard_swish,
            train=train,
            dtype=self.dtype,
        )
        x = nn.Dense(
            make_divisible(self.last_channel * self.width_mult), dtype=self.dtype, name="pre_logits"
        )(global_avg_pool(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.hard_swish(x))
        return classifier(x, self.num_classes, dtype=self.dtype)


class MobileNetV3Large(MobileNetV3):
    """torchvision's mobilenet_v3_large."""

    setting: ClassVar[tuple[tuple[int, int, int, bool, Activation, int], ...]] = (
        (3, 16, 16, False, _RE, 1),
        (3, 64, 24, False, _RE, 2),
        (3, 72, 24, False, _RE, 1),
        (5, 72, 40, True, _RE, 2),
        (5, 120, 40, True, _RE, 1),
        (5, 120, 40, True, _RE, 1),
        (3, 240, 80, False, _HS, 2),
        (3, 200, 80, False, _HS, 1),
        (3, 184, 80, False, _HS, 1),
        (3, 184, 80, False, _HS, 1),
        (3, 480, 112, True, _HS, 1),
        (3, 672, 112, True, _HS, 1),
        (5, 672, 160, True, _HS, 2),
        (5, 960, 160, True, _HS, 1),
        (5, 960, 160, True, _HS, 1),
    )
    last_channel: ClassVar[int] = 1280


class MobileNetV3Small(MobileNetV3):
    """torchvision's mobilenet_v3_small."""

    setting: ClassVar[tuple[tuple[int, int, int, bool, Activation, int], ...]] = (
        (3, 16, 16, True, _RE, 2),
        (3, 72, 24, False, _RE, 2),
        (3, 88, 24, False, _RE, 1),
        (5, 96, 40, True, _HS, 2),
        (5, 240, 40, True, _HS, 1),
        (5, 240, 40, True, _HS, 1),
        (5, 120, 48, True, _HS, 1),
        (5, 144, 48, True, _HS, 1),
        (5, 288, 96, True, _HS, 2),
        (5, 576, 96, True, _HS, 1),
        (5, 576, 96, True, _HS, 1),
    )
    last_channel: ClassVar[int] = 1024
