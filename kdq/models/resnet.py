"""ResNets: the CIFAR family of RepDistiller and torchvision's ImageNet ResNet-18/34/50.

CIFAR ResNets follow RepDistiller's `models/resnet.py` (HobbitLong/RepDistiller,
after He et al. 2016, section 4.2): a 3x3 stem of `num_filters[0]` channels,
then three stages of (depth - 2) / 6 basic blocks with `num_filters[1:]`
channels, strides 1, 2, 2. "resnet8x4" and "resnet32x4" are its 4x-wide
variants, `num_filters=(32, 64, 128, 256)`.

ImageNet ResNets follow torchvision's `models/resnet.py` (ResNet v1.5: a
bottleneck strides on its 3x3 convolution): a 7x7 stride-2 stem, 3x3 stride-2
max-pool, four stages of widths 64, 128, 256, 512 (times 4 out of a
bottleneck), global average pool and a dense classifier. `cifar_stem=True`
replaces the stem by a 3x3 stride-1 convolution without max-pool, the usual
CIFAR-10 adaptation (as in kuangliu/pytorch-cifar).

Every residual block ends in batch norm with scale initialized to one (no
zero-init of the last gamma), as torchvision's default.

Submodule paths (feature taps): "conv1", "bn1", "layer1" .. "layer3" (CIFAR) or
"layer4" (ImageNet), each holding "block_0", "block_1", ...; "fc".
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdq.models.layers import Dtype, batch_norm, classifier, conv, global_avg_pool


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, -> ReLU.

    The shortcut is the identity, or a strided 1x1 conv -> BN ("downsample_conv",
    "downsample_bn") where the stride or channel count changes.

    Attributes:
      features: output channels.
      strides: stride of the first convolution and of the shortcut.
      dtype: computation dtype.
    """

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, features)."""
        y = conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn2")(y)
        return nn.relu(y + _shortcut(x, self.features, self.strides, train, self.dtype))


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3 (strided) -> BN -> ReLU -> conv1x1 -> BN, plus shortcut, -> ReLU.

    Attributes:
      features: channels of the inner convolutions; the block outputs
        `4 * features`.
      strides: stride of the 3x3 convolution and of the shortcut.
      dtype: computation dtype.
    """

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, 4 * features)."""
        out = self.features * self.expansion
        y = conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(y))
        y = conv(out, 1, dtype=self.dtype, name="conv3")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn3")(y)
        return nn.relu(y + _shortcut(x, out, self.strides, train, self.dtype))


def _shortcut(x: jax.Array, features: int, strides: int, train: bool, dtype: Dtype) -> jax.Array:
    """Identity, or a strided 1x1 conv -> BN where the shape changes (called in a block's scope)."""
    if strides == 1 and x.shape[-1] == features:
        return x
    x = conv(features, 1, strides=strides, dtype=dtype, name="downsample_conv")(x)
    return batch_norm(train, dtype=dtype, name="downsample_bn")(x)


class ResNetStage(nn.Module):
    """`num_blocks` residual blocks "block_0", "block_1", ...; the first one strides.

    Attributes:
      block: `BasicBlock` or `Bottleneck`.
      features: the blocks' `features`.
      num_blocks: number of blocks.
      strides: stride of the first block.
      dtype: computation dtype.
    """

    block: type[BasicBlock] | type[Bottleneck]
    features: int
    num_blocks: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, the blocks' output channels)."""
        for i in range(self.num_blocks):
            strides = self.strides if i == 0 else 1
            x = self.block(self.features, strides, dtype=self.dtype, name=f"block_{i}")(x, train)
        return x


class CifarResNet(nn.Module):
    """RepDistiller's CIFAR ResNet with basic blocks.

    Attributes:
      num_classes: number of output logits.
      depth: number of weighted layers, 6n + 2 for n blocks per stage.
      num_filters: stem channels, then the channels of each stage (the first
        stage has stride 1, the others stride 2).
      dtype: computation dtype (e.g. jnp.bfloat16); params stay float32.
    """

    num_classes: int
    depth: int = 20
    num_filters: Sequence[int] = (16, 16, 32, 64)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images (B, H, W, C) to logits (B, num_classes)."""
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got depth={self.depth}")
        blocks = (self.depth - 2) // 6
        x = conv(self.num_filters[0], 3, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        for i, features in enumerate(self.num_filters[1:]):
            x = ResNetStage(
                BasicBlock,
                features,
                blocks,
                strides=1 if i == 0 else 2,
                dtype=self.dtype,
                name=f"layer{i + 1}",
            )(x, train)
        return classifier(global_avg_pool(x), self.num_classes, dtype=self.dtype)


class ResNet8(CifarResNet):
    """RepDistiller's resnet8: `CifarResNet` with depth 8 (one block per stage)."""

    depth: int = 8


class ResNet14(CifarResNet):
    """RepDistiller's resnet14: `CifarResNet` with depth 14."""

    depth: int = 14


class ResNet20(CifarResNet):
    """RepDistiller's resnet20: `CifarResNet` with depth 20."""

    depth: int = 20


class ResNet32(CifarResNet):
    """RepDistiller's resnet32: `CifarResNet` with depth 32."""

    depth: int = 32


class ResNet44(CifarResNet):
    """RepDistiller's resnet44: `CifarResNet` with depth 44."""

    depth: int = 44


class ResNet56(CifarResNet):
    """RepDistiller's resnet56: `CifarResNet` with depth 56."""

    depth: int = 56


class ResNet110(CifarResNet):
    """RepDistiller's resnet110: `CifarResNet` with depth 110."""

    depth: int = 110


class ResNet8x4(CifarResNet):
    """RepDistiller's resnet8x4: depth 8, `num_filters=(32, 64, 128, 256)`."""

    depth: int = 8
    num_filters: Sequence[int] = (32, 64, 128, 256)


class ResNet32x4(CifarResNet):
    """RepDistiller's resnet32x4: depth 32, `num_filters=(32, 64, 128, 256)`."""

    depth: int = 32
    num_filters: Sequence[int] = (32, 64, 128, 256)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet (v1.5).

    Attributes:
      num_classes: number of output logits.
      stage_sizes: number of blocks in each stage (stage i has
        `width * 2**i` channels, or 4 times that out of a bottleneck, and
        stride 2 except the first).
      bottleneck: use `Bottleneck` blocks rather than `BasicBlock`.
      width: channels of the stem and of the first stage.
      cifar_stem: a 3x3 stride-1 stem without max-pool, for 32x32 images.
      dtype: computation dtype (e.g. jnp.bfloat16); params stay float32.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    bottleneck: bool = False
    width: int = 64
    cifar_stem: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images (B, H, W, C) to logits (B, num_classes)."""
        if self.cifar_stem:
            x = conv(self.width, 3, dtype=self.dtype, name="conv1")(x)
        else:
            x = conv(self.width, 7, strides=2, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = Bottleneck if self.bottleneck else BasicBlock
        for i, num_blocks in enumerate(self.stage_sizes):
            x = ResNetStage(
                block,
                self.width * 2**i,
                num_blocks,
                strides=1 if i == 0 else 2,
                dtype=self.dtype,
                name=f"layer{i + 1}",
            )(x, train)
        return classifier(global_avg_pool(x), self.num_classes, dtype=self.dtype)


class ResNet18(ResNet):
    """torchvision's resnet18: basic blocks, stages (2, 2, 2, 2)."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)


class ResNet34(ResNet):
    """torchvision's resnet34: basic blocks, stages (3, 4, 6, 3)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)


class ResNet50(ResNet):
    """torchvision's resnet50: bottleneck blocks, stages (3, 4, 6, 3)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    bottleneck: bool = True
