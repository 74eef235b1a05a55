"""Rotary position embeddings and masked dot-product attention over grouped key/value heads.

Shapes: queries (B, T, H, Dh), keys and values (B, S, K, Dh) where the K
key/value heads divide the H query heads (grouped-query attention, Ainslie et
al. 2023; K = H is multi-head attention, K = 1 multi-query attention). Query
head h reads key/value head h // (H / K), so consecutive query heads share one.
Scores and softmax are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The score of a masked key: exp(MASKED - max) is 0 next to any visible key, and a
# row without visible keys averages all values instead of turning into NaN.
MASKED = float(jnp.finfo(jnp.float32).min)


def rotate_half(x: jax.Array) -> jax.Array:
    """(x1, x2) -> (-x2, x1), the halves taken over the last axis.

    Args:
      x: an array whose last axis has even length.

    Returns:
      The array with its halves swapped and the new first half negated.
    """
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (RoPE, Su et al. 2021), rotate-half convention.

    Feature i < Dh / 2 of a head is paired with feature i + Dh / 2, and the pair
    at position p is rotated by the angle p * theta_i, theta_i = base^(-2i / Dh):

        x' = x * cos(p * theta) + rotate_half(x) * sin(p * theta)

    (theta repeated over both halves), so that the dot product of a rotated query
    at p and a rotated key at q depends on p - q only.

    Args:
      x: (B, T, heads, Dh) queries or keys, Dh even.
      positions: (T,) integer positions of the T tokens.
      base: the wavelength base.

    Returns:
      The rotated array, in x's dtype (the rotation is computed in float32).

    Raises:
      ValueError: Dh is odd.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
    frequencies = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * frequencies
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]  # (T, 1, Dh)
    rotated = x.astype(jnp.float32) * jnp.cos(angles)
    rotated = rotated + rotate_half(x.astype(jnp.float32)) * jnp.sin(angles)
    return rotated.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked scaled dot-product attention with grouped key/value heads.

    For query head h and its key/value head g = h // (H / K):

        out[b, t, h] = sum_s softmax_s(q[b, t, h] . k[b, s, g] / sqrt(Dh)) v[b, s, g],

    the softmax taken over the keys s with mask[b, t, s] true.

    Args:
      q: (B, T, H, Dh) queries.
      k: (B, S, K, Dh) keys, K dividing H.
      v: (B, S, K, Dh) values.
      mask: booleans broadcastable to (B, T, S); True where query t may see key s.

    Returns:
      (B, T, H, Dh) in v's dtype.

    Raises:
      ValueError: K does not divide H.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads do not divide {heads} query heads")
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    visible = jnp.broadcast_to(mask, (batch, length, k.shape[1]))[:, None, None]
    weights = jax.nn.softmax(jnp.where(visible, scores, MASKED), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v)
    return out.reshape(batch, length, heads, head_dim)
