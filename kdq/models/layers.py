"""Layers shared by the model zoo, laid out as in PyTorch so that shapes and counts match.

Convolutions pad by `(kernel_size - 1) // 2` on every side (PyTorch's
`padding=k // 2`), not XLA's "SAME", which pads stride-2 convolutions
asymmetrically. Batch norm uses PyTorch's defaults: momentum 0.1 (Linen's
`momentum=0.9`, the weight of the old running average) and epsilon 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision's and RepDistiller's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A square convolution padded like PyTorch's `Conv2d(padding=kernel_size // 2)`.

    Args:
      features: output channels.
      kernel_size: height and width of the kernel.
      strides: stride in both spatial dimensions.
      groups: feature groups (the input channels for a depthwise convolution).
      use_bias: whether to add a bias (False where a batch norm follows).
      dtype: computation dtype; the kernel is stored in float32.
      name: the submodule's name.

    Returns:
      The `nn.Conv` submodule.
    """
    pad = (kernel_size - 1) // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=conv_init,
        name=name,
    )


def batch_norm(train: bool, *, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """Batch norm with PyTorch's defaults; running statistics live in "batch_stats".

    Args:
      train: normalize with the batch statistics and update the running ones
        (requires `mutable=["batch_stats"]`) rather than use the running ones.
      dtype: computation dtype; statistics are reduced in float32.
      name: the submodule's name.

    Returns:
      The `nn.BatchNorm` submodule.
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm -> optional activation (torchvision's `Conv2dNormActivation`).

    Attributes:
      features: output channels.
      kernel_size: height and width of the kernel.
      strides: stride in both spatial dimensions.
      groups: feature groups (the input channels for a depthwise convolution).
      activation: applied after the batch norm; None for a linear output.
      dtype: computation dtype.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    groups: int = 1
    activation: Callable[[jax.Array], jax.Array] | None = nn.relu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, features)."""
        x = conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            groups=self.groups,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = batch_norm(train, dtype=self.dtype, name="bn")(x)
        return x if self.activation is None else self.activation(x)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial dimensions: (B, H, W, C) -> (B, C)."""
    return jnp.mean(x, axis=(1, 2))


def classifier(x: jax.Array, num_classes: int, *, dtype: Dtype, name: str = "fc") -> jax.Array:
    """The final dense layer; the logits are returned in float32 whatever `dtype` is.

    Args:
      x: pooled features (B, C).
      num_classes: number of output logits.
      dtype: computation dtype of the dense layer.
      name: the submodule's name.

    Returns:
      Logits (B, num_classes), float32.
    """
    return nn.Dense(num_classes, dtype=dtype, name=name)(x).astype(jnp.float32)
