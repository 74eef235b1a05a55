"""A BERT-style transformer encoder classifier (Devlin et al. 2019).

token + learned position (+ token-type) embeddings -> LayerNorm -> L post-norm layers

    x = layer_norm(x + attn(x)),   x = layer_norm(x + down(gelu(up(x))))

-> pooling -> Dense "head" (with `head=False` the pooled features themselves,
e.g. a sentence embedding). LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) *
scale + bias; GELU is the exact x * Phi(x) unless `approximate_gelu` (tanh
form). Attention is multi-head with biases (`kdq.models.attention`); with
`pad_id` set, keys holding it are masked and "mean" pooling averages the other
tokens only. "cls" pooling takes the first token's output (no pooler layer).
The per-token hidden states (B, T, d) are the outputs of the submodules
"layer_i" (the last one: "layer_{L-1}"), e.g. through `kdq.distill.taps`.
Embeddings start as N(0, 0.02^2), the Dense layers with Linen's defaults.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdq.models.attention import attention

Dtype = Any
EMBED_INIT = nn.initializers.normal(stddev=0.02)
POOLINGS = ("cls", "mean")


class EncoderSelfAttention(nn.Module):
    """Multi-head self-attention with biases: o(attention(q(x), k(x), v(x))).

    Attributes:
      num_heads: heads H (divides the width d; each has d / H features).
      dtype: computation dtype.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Maps (B, T, d) to (B, T, d); `mask` (B, 1, T) is True at keys that may be seen."""
        batch, length, features = x.shape
        shape = (batch, length, self.num_heads, features // self.num_heads)
        dense = functools.partial(nn.Dense, features, dtype=self.dtype)
        q, k, v = (dense(name=name)(x).reshape(shape) for name in ("q", "k", "v"))
        out = attention(q, k, v, mask).reshape(batch, length, features)
        return dense(name="o")(out)


class EncoderMLP(nn.Module):
    """down(gelu(up(x))), with biases.

    Attributes:
      mlp_dim: hidden width.
      approximate_gelu: tanh approximation of GELU instead of the exact erf form.
      dtype: computation dtype.
    """

    mlp_dim: int
    approximate_gelu: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps (B, T, d) to (B, T, d)."""
        hidden = nn.Dense(self.mlp_dim, dtype=self.dtype, name="up")(x)
        hidden = nn.gelu(hidden, approximate=self.approximate_gelu)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="down")(hidden)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: layer_norm(x + attn(x)), then layer_norm(. + mlp(.)).

    Attributes:
      num_heads: attention heads.
      mlp_dim: MLP hidden width.
      norm_eps: LayerNorm epsilon.
      approximate_gelu: tanh GELU instead of the exact one.
      dtype: computation dtype.
    """

    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-12
    approximate_gelu: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Maps (B, T, d) to (B, T, d); `mask` as in `EncoderSelfAttention`."""
        norm = functools.partial(nn.LayerNorm, epsilon=self.norm_eps, dtype=self.dtype)
        x = norm(name="attn_norm")(
            x + EncoderSelfAttention(self.num_heads, self.dtype, name="attn")(x, mask)
        )
        mlp = EncoderMLP(self.mlp_dim, self.approximate_gelu, self.dtype, name="mlp")
        return norm(name="mlp_norm")(x + mlp(x))


class TransformerEncoder(nn.Module):
    """BERT-style encoder classifier (see the module docstring); defaults are `EncoderTiny`'s.

    Attributes:
      num_classes: output logits (unused without a head).
      vocab_size: token vocabulary.
      num_layers: encoder layers.
      d_model: width.
      num_heads: attention heads (divides d_model).
      mlp_dim: MLP hidden width.
      max_len: positions of the learned position embedding (longest input).
      type_vocab_size: token types (BERT's segments); 0: no type embedding.
      pooling: "cls" (first token) or "mean" (over non-padding tokens).
      pad_id: the padding token, masked out of attention and mean pooling;
        None: no padding.
      norm_eps: LayerNorm epsilon.
      approximate_gelu: tanh GELU instead of the exact erf one.
      dtype: computation dtype; params and outputs stay float32.
      head: end with the Dense "head" (class logits); False: return the pooled
        features and create no head params.
    """

    num_classes: int
    vocab_size: int = 256
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    max_len: int = 256
    type_vocab_size: int = 0
    pooling: str = "cls"
    pad_id: int | None = None
    norm_eps: float = 1e-12
    approximate_gelu: bool = False
    dtype: Dtype = jnp.float32
    head: bool = True

    @nn.compact
    def __call__(
        self, tokens: jax.Array, token_types: jax.Array | None = None, train: bool = False
    ):
        """Class logits (or, with head=False, pooled features) of each sequence.

        Args:
          tokens: (B, T) int token ids, T <= max_len.
          token_types: (B, T) int token types (needs type_vocab_size > 0);
            None: all type 0.
          train: accepted for the trainer and ignored (no dropout).

        Returns:
          (B, num_classes) float32 logits; with head=False, (B, d_model)
          float32 pooled features.

        Raises:
          ValueError: bad tokens, token types without a type embedding, a bad
            pooling, or num_heads not dividing d_model.
        """
        del train
        self._check_call(tokens, token_types)
        embed = functools.partial(
            nn.Embed, features=self.d_model, dtype=self.dtype, embedding_init=EMBED_INIT
        )
        x = embed(self.vocab_size, name="embed")(tokens)
        x = x + embed(self.max_len, name="pos_embed")(jnp.arange(tokens.shape[1]))[None]
        if self.type_vocab_size:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + embed(self.type_vocab_size, name="type_embed")(types)
        x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="embed_norm")(x)
        keep = jnp.ones(tokens.shape, bool) if self.pad_id is None else tokens != self.pad_id
        for i in range(self.num_layers):
            layer = EncoderLayer(
                self.num_heads,
                self.mlp_dim,
                self.norm_eps,
                self.approximate_gelu,
                self.dtype,
                name=f"layer_{i}",
            )
            x = layer(x, keep[:, None, :])
        pooled = x[:, 0] if self.pooling == "cls" else masked_mean(x, keep)
        if not self.head:
            return pooled.astype(jnp.float32)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(pooled).astype(jnp.float32)

    def _check_call(self, tokens: Any, token_types: Any) -> None:
        """Raises ValueError for inputs or sizes the encoder cannot take."""
        shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
        if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an int array of shape (batch, length), got shape={shape} "
                f"dtype={dtype}; pass token ids, e.g. jnp.asarray(ids, jnp.int32)"
            )
        if not 1 <= shape[1] <= self.max_len:
            raise ValueError(f"sequence length {shape[1]} must lie in [1, max_len={self.max_len}]")
        if token_types is not None and not self.type_vocab_size:
            raise ValueError("token_types given but type_vocab_size=0; set type_vocab_size >= 1")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} must be one of {POOLINGS}")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")


def masked_mean(x: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean of x over the sequence positions where `keep` is true.

    mean[b] = sum_t keep[b, t] x[b, t] / max(1, sum_t keep[b, t]) (a sequence of
    padding only pools to zeros).

    Args:
      x: (B, T, d) features.
      keep: (B, T) booleans.

    Returns:
      (B, d) means, in x's dtype.
    """
    weights = keep.astype(x.dtype)[..., None]
    count = jnp.maximum(weights.sum(axis=1), 1)
    return (x * weights).sum(axis=1) / count


class EncoderTiny(TransformerEncoder):
    """d_model 128, 2 layers, 4 heads, MLP 512, 256 positions."""

    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    max_len: int = 256


class EncoderSmall(TransformerEncoder):
    """d_model 256, 4 layers, 4 heads, MLP 1024, 512 positions."""

    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    max_len: int = 512
