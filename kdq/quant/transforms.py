"""Function-preserving input transforms of quantized Dense layers (rotation, smoothing).

Post-training methods that move difficulty between a layer's activations and
its weights change the pair (x, W) of a Dense layer y = x W + b into

    x' = (x R) / s,        W' = diag(s) R^T W,        x' W' = x R R^T W = x W,

with R an orthogonal K x K rotation (a randomised Hadamard matrix, QuaRot,
Ashkboos et al. 2024) and s > 0 one divisor per input channel (SmoothQuant,
Xiao et al. 2023; AWQ, Lin et al. 2024). In float arithmetic the layer is
unchanged; it is W' that is quantized, and x' that an activation quantizer
sees. kdq keeps the transform explicit, one entry per module path,

    {"rotation_signs": d (K,), "smoothing": s (K,)}   (either key optional),

R = diag(d) H / sqrt(K) for the Hadamard matrix H of order K
(`kdq.quant.rotation`), and applies it to the module's input at run time
(`transform_interceptor`), instead of folding s into the previous op and R
into the residual stream: that works on any Linen model without rewriting
it, at the cost of one elementwise divide and, with a rotation, one K x K
matrix product per call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdq.quant.intercept import lookup, module_path
from kdq.quant.rotation import rotate, rotate_weight

TRANSFORM_KEYS = ("rotation_signs", "smoothing")


def transform_input(x: jax.Array, transform: dict[str, Any]) -> jax.Array:
    """x' = (x R) / s along x's last (contracted) axis.

    Args:
      x: a Dense layer's input (..., K).
      transform: {"rotation_signs"?: (K,), "smoothing"?: (K,)}; an absent
        key is the identity.

    Returns:
      The transformed input, in x's dtype.
    """
    if "rotation_signs" in transform:
        x = rotate(x, transform["rotation_signs"])
    if "smoothing" in transform:
        x = x / jnp.asarray(transform["smoothing"], x.dtype)
    return x


def transform_kernel(kernel: np.ndarray, transform: dict[str, Any]) -> np.ndarray:
    """W' = diag(s) R^T W, so that transform_input(x, transform) @ W' == x @ W.

    Args:
      kernel: (K, N) Dense kernel.
      transform: as for `transform_input`.

    Returns:
      (K, N) float64 transformed kernel.
    """
    kernel = np.asarray(kernel, np.float64)
    if "rotation_signs" in transform:
        kernel = np.asarray(rotate_weight(kernel, np.asarray(transform["rotation_signs"])))
    if "smoothing" in transform:
        kernel = np.asarray(transform["smoothing"], np.float64)[:, None] * kernel
    return kernel


def transform_interceptor(transforms: Any):
    """An interceptor applying each Dense module's input transform before the module runs.

    Args:
      transforms: {module path...: {"rotation_signs"?, "smoothing"?}} nested by
        module path (see module docstring); modules without an entry run unchanged.

    Returns:
      A function for `flax.linen.intercept_methods`. Enter it outside any
      activation interceptor, so activation quantizers see the transformed input.
    """

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
            return next_fun(*args, **kwargs)
        try:
            transform = lookup(transforms, module_path(context.module))
        except (KeyError, TypeError):
            return next_fun(*args, **kwargs)
        if not isinstance(transform, dict) or not set(transform) & set(TRANSFORM_KEYS):
            return next_fun(*args, **kwargs)
        return next_fun(transform_input(args[0], transform), *args[1:], **kwargs)

    return interceptor
