"""Small Linen classifiers for 8x8 digits, MNIST-sized and CIFAR-sized images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """Multi-layer perceptron: flatten -> [Dense -> ReLU] * len(hidden) -> Dense.

    Attributes:
      num_classes: number of output logits.
      hidden: widths of the hidden layers.
      dtype: computation dtype (e.g. bfloat16 on GPU/TPU); params and logits
        stay float32.
    """

    num_classes: int
    hidden: Sequence[int] = (64,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images (B, H, W, C) (or any (B, ...)) to logits (B, num_classes)."""
        del train
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN(nn.Module):
    """Convolutional net: [Conv3x3 -> ReLU -> AvgPool2] * len(channels) -> Dense -> ReLU -> Dense.

    Attributes:
      num_classes: number of output logits.
      channels: output channels of each conv stage (each halves the spatial size).
      dense: width of the hidden dense layer.
      dtype: computation dtype (e.g. bfloat16 on GPU/TPU); params and logits
        stay float32.
    """

    num_classes: int
    channels: Sequence[int] = (32, 64)
    dense: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images (B, H, W, C) to logits (B, num_classes)."""
        del train
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype)(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def count_params(params) -> int:
    """Number of scalar parameters in a pytree.

    Args:
      params: a pytree of arrays (or ShapeDtypeStructs).

    Returns:
      The total number of elements.
    """
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
