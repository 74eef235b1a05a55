"""Wide ResNets (Zagoruyko & Komodakis, 2016) as in RepDistiller's `models/wrn.py`.

A 3x3 stem of 16 channels, three stages of (depth - 4) / 6 pre-activation
blocks with 16k, 32k, 64k channels (k the widen factor) and strides 1, 2, 2,
then BN -> ReLU, global average pool and a dense classifier.

Submodule paths (feature taps): "conv1", "block1" .. "block3", each holding
"block_0", "block_1", ...; "bn1" (the final batch norm); "fc".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdq.models.layers import Dtype, batch_norm, classifier, conv, global_avg_pool


class _WideLayer(nn.Module):
    """The options of a pre-activation block and of a stage of them.

    Attributes:
      features: output channels.
      strides: stride of the first convolution and of the shortcut (of the
        first block in a stage).
      dropout: dropout rate between the convolutions (needs a "dropout" rng
        when training with a rate above 0).
      dtype: computation dtype.
    """

    features: int
    strides: int = 1
    dropout: float = 0.0
    dtype: Dtype = jnp.float32


class WideBasicBlock(_WideLayer):
    """Pre-activation block: BN -> ReLU -> conv3x3 -> BN -> ReLU -> dropout -> conv3x3, plus shortcut.

    Where the stride or channel count changes, the shortcut is a strided 1x1
    conv ("conv_shortcut") of the pre-activated input; otherwise it is the
    input itself. Attributes: see `_WideLayer`.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, features)."""
        pre = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        if self.strides == 1 and x.shape[-1] == self.features:
            shortcut = x
        else:
            shortcut = conv(
                self.features, 1, strides=self.strides, dtype=self.dtype, name="conv_shortcut"
            )(pre)
        y = conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv1")(pre)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(y))
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        return shortcut + y


class WideResNetStage(_WideLayer):
    """`num_blocks` pre-activation blocks "block_0", "block_1", ...; the first one strides.

    Attributes (besides `_WideLayer`'s):
      num_blocks: number of blocks.
    """

    num_blocks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, features)."""
        for i in range(self.num_blocks):
            x = WideBasicBlock(
                self.features,
                self.strides if i == 0 else 1,
                dropout=self.dropout,
                dtype=self.dtype,
                name=f"block_{i}",
            )(x, train)
        return x


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR.

    Attributes:
      num_classes: number of output logits.
      depth: number of weighted layers, 6n + 4 for n blocks per stage.
      widen_factor: k, the multiplier of the stage widths 16, 32, 64.
      dropout: dropout rate inside each block (RepDistiller uses 0).
      dtype: computation dtype (e.g. jnp.bfloat16); params stay float32.
    """

    num_classes: int
    depth: int = 16
    widen_factor: int = 2
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images (B, H, W, C) to logits (B, num_classes)."""
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got depth={self.depth}")
        blocks = (self.depth - 4) // 6
        x = conv(16, 3, dtype=self.dtype, name="conv1")(x)
        for i, width in enumerate((16, 32, 64)):
            x = WideResNetStage(
                width * self.widen_factor,
                strides=1 if i == 0 else 2,
                num_blocks=blocks,
                dropout=self.dropout,
                dtype=self.dtype,
                name=f"block{i + 1}",
            )(x, train)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        return classifier(global_avg_pool(x), self.num_classes, dtype=self.dtype)


class WRN16x2(WideResNet):
    """RepDistiller's wrn_16_2: depth 16, widen factor 2."""

    depth: int = 16
    widen_factor: int = 2


class WRN40x2(WideResNet):
    """RepDistiller's wrn_40_2: depth 40, widen factor 2."""

    depth: int = 40
    widen_factor: int = 2
