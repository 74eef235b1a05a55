"""Transformers: a decoder-only language model with a KV cache, and a BERT-style encoder.

`TransformerLM` (LLaMA-style): token embedding -> L pre-norm blocks
    x = x + attn(rms_norm(x)),   x = x + mlp(rms_norm(x))
-> RMSNorm -> logits, where `attn` is causal grouped-query attention with rotary
position embeddings (`kdq.models.attention`) and `mlp` is SwiGLU,
down(silu(gate(x)) * up(x)) (Shazeer 2020). RMSNorm(x) = x / sqrt(mean(x^2) +
eps) * scale. No biases. The output embedding is the input one (tied, logits =
h E^T) or a Dense "head". Embeddings start as N(0, 0.02^2) (GPT-2), the
projections with Linen's default LeCun-normal init.

`TransformerEncoder` (BERT-style, `kdq.models.encoder`): post-norm layers with
biases, then "cls" or masked "mean" pooling and a Dense "head".
`transformer_param_count` counts either from its attributes.

Every projection is a 2-D `nn.Dense` (kernel (in, out)), so quantization,
pruning and sharding rules address kernels and module paths as for any model,
e.g. "block_1/attn/q" or "block_0/mlp/down/kernel". Heads are contiguous
blocks of head_dim columns of the q/k/v kernels (and rows of o). `dtype` is
the computation dtype; params stay float32 and logits are returned as float32
whatever `dtype` (a bfloat16 model computes in bfloat16, softmax and norms in
float32).

KV cache: `init_kv_cache(model, batch)` gives {"index": int32 next position,
"block_i": {"k", "v": (B, max_len, K, Dh)}}; `model.apply(variables, tokens,
cache=cache)` appends the tokens at `index` and returns (logits, new cache).
The new keys and values are written first and the tokens attend over the
stored entries, so a prefill reads exactly what later decoding steps read.

Quantized KV cache: `init_kv_cache(model, batch, bits=8)` (or 4) stores k and
v as `kdq.quant.QArray`s, signed symmetric integers with one float32 scale per
(batch, position, kv head):

    s[b, t, h] = max_d |k[b, t, h, d]| / qmax,   q = clip(round(k / s), qmin, qmax),

qmax = 2^(bits-1) - 1 (127 or 7), [qmin, qmax] = [-128, 127] or [-8, 7],
round half to even; |k / s| <= qmax, so qmin is never reached and the levels
used are symmetric. An all-zero entry gets s = 1 (`kdq.quant.numerics`).
Each token's scale is computed from its own keys (values) when it is
written: the cache grows token by token, so a static scale would need
calibration on data, and a scale per token and head follows the spread of
magnitudes across positions and heads. Attention reads q * s, cast to the
model dtype. Since a token's stored entry depends on nothing written after
it, a prefill through a quantized cache gives the logits that token-by-token
decoding with that cache gives.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdq.models.attention import attention, rotary_embedding
from kdq.models.encoder import EncoderSmall, EncoderTiny, TransformerEncoder
from kdq.quant.numerics import dequantize, quantize
from kdq.quant.qarray import QArray
from kdq.quant.spec import QuantSpec

Dtype = Any
EMBED_INIT = nn.initializers.normal(stddev=0.02)
# Integer widths of a quantized KV cache (`init_kv_cache(..., bits=)`).
KV_CACHE_BITS = (4, 8)


class CausalSelfAttention(nn.Module):
    """Grouped-query self-attention with RoPE, optionally reading and writing a KV cache.

    Attributes:
      num_heads: query heads H.
      num_kv_heads: key/value heads K (divides H).
      head_dim: features per head Dh.
      rope_base: RoPE wavelength base.
      dtype: computation dtype.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float = 10000.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache=None, index=0):
        """Maps x (B, T, d) to (B, T, d) and the updated cache entry.

        Args:
          x: (B, T, d) normalized inputs.
          positions: (T,) positions of the tokens.
          mask: (T, S) booleans, True where query t may see key s; S is T
            without a cache and max_len with one.
          kv_cache: None, or {"k", "v"}: (B, max_len, K, Dh) float arrays, or
            `QArray`s of that shape with scales (B, max_len, K, 1).
          index: cache position of the first token.

        Returns:
          (B, T, d) outputs; with a cache, (outputs, {"k", "v"} holding the new
          keys and values at `index`).
        """
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
        batch, length, features = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = dense(heads * head_dim, name="q")(x).reshape(batch, length, heads, head_dim)
        k = dense(kv_heads * head_dim, name="k")(x).reshape(batch, length, kv_heads, head_dim)
        v = dense(kv_heads * head_dim, name="v")(x).reshape(batch, length, kv_heads, head_dim)
        q = rotary_embedding(q, positions, self.rope_base)
        k = rotary_embedding(k, positions, self.rope_base)
        if kv_cache is not None:
            stored = {
                name: _write_cache(kv_cache[name], new, index) for name, new in (("k", k), ("v", v))
            }
            k, v = (_read_cache(stored[name], self.dtype) for name in ("k", "v"))
        out = attention(q, k, v, mask).reshape(batch, length, heads * head_dim)
        out = dense(features, name="o")(out)
        return out if kv_cache is None else (out, stored)


def _write_cache(entry: jax.Array | QArray, new: jax.Array, index: Any) -> jax.Array | QArray:
    """The cache entry with `new` (B, T, K, Dh) written at positions index .. index + T - 1.

    A float entry stores `new` in its dtype; a `QArray` entry stores
    quantize(new, entry.spec), its integers and its (B, T, K, 1) scales.
    """
    start = (0, index, 0, 0)
    if not isinstance(entry, QArray):
        return jax.lax.dynamic_update_slice(entry, new.astype(entry.dtype), start)
    written = quantize(new, entry.spec)
    return QArray(
        qvalue=jax.lax.dynamic_update_slice(entry.qvalue, written.qvalue, start),
        scale=jax.lax.dynamic_update_slice(entry.scale, written.scale, start),
        zero_point=None,
        spec=entry.spec,
    )


def _read_cache(entry: jax.Array | QArray, dtype: Dtype) -> jax.Array:
    """The keys or values attention reads: the entry itself, or q * s in `dtype`."""
    return dequantize(entry).astype(dtype) if isinstance(entry, QArray) else entry


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases.

    Attributes:
      mlp_dim: hidden width.
      dtype: computation dtype.
    """

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps (B, T, d) to (B, T, d)."""
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
        hidden = nn.silu(dense(self.mlp_dim, name="gate")(x)) * dense(self.mlp_dim, name="up")(x)
        return dense(x.shape[-1], name="down")(hidden)


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: x + attn(rms_norm(x)), then + mlp(rms_norm(.)).

    Attributes:
      num_heads, num_kv_heads, head_dim, rope_base: of `CausalSelfAttention`.
      mlp_dim: SwiGLU hidden width.
      norm_eps: RMSNorm epsilon.
      dtype: computation dtype.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache=None, index=0):
        """Maps (B, T, d) to (B, T, d); with a cache, also its updated entry.

        Arguments as for `CausalSelfAttention`.
        """
        norm = functools.partial(nn.RMSNorm, epsilon=self.norm_eps, dtype=self.dtype)
        attn = CausalSelfAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.rope_base,
            self.dtype,
            name="attn",
        )
        attended = attn(norm(name="attn_norm")(x), positions, mask, kv_cache, index)
        attended, new_cache = (attended, None) if kv_cache is None else attended
        x = x + attended
        x = x + SwiGLU(self.mlp_dim, self.dtype, name="mlp")(norm(name="mlp_norm")(x))
        return x if kv_cache is None else (x, new_cache)


class TransformerLM(nn.Module):
    """Decoder-only language model (see the module docstring); defaults are `LMTiny`'s.

    Attributes:
      num_classes: vocabulary size V.
      num_layers: decoder blocks.
      d_model: residual width.
      num_heads: query heads.
      num_kv_heads: key/value heads (divides num_heads); None: num_heads.
      head_dim: features per head (even, for RoPE); None: d_model // num_heads.
      mlp_dim: SwiGLU hidden width.
      max_len: longest sequence, cached positions included.
      tie_embeddings: logits from the input embedding (True) or a Dense "head".
      rope_base: RoPE wavelength base.
      norm_eps: RMSNorm epsilon.
      dtype: computation dtype; params and logits stay float32.
    """

    num_classes: int
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = 2
    head_dim: int | None = None
    mlp_dim: int = 384
    max_len: int = 256
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, cache: dict | None = None, train: bool = False):
        """Logits of the next token at every position.

        Args:
          tokens: (B, T) int token ids.
          cache: None, or a cache from `init_kv_cache` (or a previous cached
            call): the tokens then take positions index .. index + T - 1 and
            attend to every cached position before them.
          train: accepted for the trainer and ignored (no dropout).

        Returns:
          (B, T, V) float32 logits; with a cache, (logits, the cache holding
          the new tokens, its index advanced by T).

        Raises:
          ValueError: tokens are not int (B, T), the sizes do not fit together,
            or T (with a concrete cache index, index + T) exceeds max_len.
        """
        del train
        kv_heads, head_dim = _lm_heads(self)
        index = _check_lm_call(self, tokens, cache)
        length = tokens.shape[1]
        positions = index + jnp.arange(length)
        keys = jnp.arange(length if cache is None else self.max_len)
        mask = keys[None, :] <= positions[:, None]
        embed = nn.Embed(
            self.num_classes, self.d_model, self.dtype, embedding_init=EMBED_INIT, name="embed"
        )
        x = embed(tokens)
        new_cache = {"index": jnp.asarray(index + length, jnp.int32)}
        for i in range(self.num_layers):
            block = DecoderBlock(
                num_heads=self.num_heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                mlp_dim=self.mlp_dim,
                rope_base=self.rope_base,
                norm_eps=self.norm_eps,
                dtype=self.dtype,
                name=f"block_{i}",
            )
            if cache is None:
                x = block(x, positions, mask)
            else:
                x, new_cache[f"block_{i}"] = block(x, positions, mask, cache[f"block_{i}"], index)
        x = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, name="final_norm")(x)
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, name="head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def _lm_heads(model: TransformerLM) -> tuple[int, int]:
    """(key/value heads, head dim) of `model`, its None defaults resolved.

    Raises:
      ValueError: the heads do not fit d_model, or each other.
    """
    kv_heads = model.num_heads if model.num_kv_heads is None else model.num_kv_heads
    if model.num_heads % kv_heads:
        raise ValueError(
            f"num_kv_heads={kv_heads} must divide num_heads={model.num_heads} "
            "(grouped-query attention shares each key/value head among num_heads / num_kv_heads)"
        )
    head_dim = model.head_dim
    if head_dim is None:
        if model.d_model % model.num_heads:
            raise ValueError(
                f"num_heads={model.num_heads} must divide d_model={model.d_model}, "
                "or give head_dim explicitly"
            )
        head_dim = model.d_model // model.num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even (rotary embeddings rotate pairs)")
    return kv_heads, head_dim


def _check_tokens(tokens: Any, max_len: int) -> None:
    """Raises ValueError unless `tokens` is an int (B, T) array with 1 <= T <= max_len."""
    shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
    if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"tokens must be an int array of shape (batch, length), got shape={shape} "
            f"dtype={dtype}; pass token ids, e.g. jnp.asarray(ids, jnp.int32)"
        )
    if not 1 <= shape[1] <= max_len:
        raise ValueError(f"sequence length {shape[1]} must lie in [1, max_len={max_len}]")


def _check_lm_call(model: TransformerLM, tokens: Any, cache: dict | None) -> Any:
    """Checks a `TransformerLM` call and returns the first token's position.

    The bound index + T <= max_len is checked when the cache index is concrete
    (outside `jax.jit`); under `jit` it is the caller's to keep, as
    `kdq.generate` does before tracing.

    Raises:
      ValueError: bad tokens, a cache not made for this model, or a cache overflow.
    """
    _check_tokens(tokens, model.max_len)
    if cache is None:
        return 0
    needed = {"index", *(f"block_{i}" for i in range(model.num_layers))}
    if not isinstance(cache, dict) or not needed <= set(cache):
        found = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
        raise ValueError(
            f"cache must hold {sorted(needed)}, got {found}; "
            "make it with init_kv_cache(model, batch)"
        )
    index = cache["index"]
    if not isinstance(index, jax.core.Tracer) and int(index) + tokens.shape[1] > model.max_len:
        raise ValueError(
            f"the cache holds {int(index)} positions and {tokens.shape[1]} more exceed "
            f"max_len={model.max_len}; start a new cache or build the model with a larger max_len"
        )
    return index


def check_cache_bits(bits: Any, name: str = "bits") -> None:
    """Raises ValueError unless `bits` is None or one of `KV_CACHE_BITS`.

    Args:
      bits: the requested cache width.
      name: the argument's name, for the message.
    """
    if bits is not None and (
        isinstance(bits, bool) or not isinstance(bits, int) or bits not in KV_CACHE_BITS
    ):
        raise ValueError(
            f"{name} must be None (a float cache in the model dtype) or one of "
            f"{KV_CACHE_BITS} (an integer cache), got {name}={bits!r}"
        )


def init_kv_cache(
    model: TransformerLM, batch_size: int, *, bits: int | None = None
) -> dict[str, Any]:
    """An empty KV cache for `model`: nothing written, index 0.

    Args:
      model: a `TransformerLM` (or a named size).
      batch_size: sequences decoded together.
      bits: None for a float cache in the model dtype; 8 or 4 for k and v
        stored as signed integers with a float32 scale per (batch, position,
        kv head), s = max_d |x| / (2^(bits-1) - 1) (see the module docstring).

    Returns:
      {"index": int32 0, "block_i": {"k", "v"}} for every block. Float: k and v
      zeros (batch_size, max_len, num_kv_heads, head_dim) in the model dtype.
      Quantized: k and v `QArray`s of that shape, qvalue zeros of int8 (int4),
      scale ones (batch_size, max_len, num_kv_heads, 1) float32, no zero point;
      as a pytree the cache holds the integers and the scales, so `jit` and
      `scan` carry it.

    Raises:
      ValueError: `model` is not a `TransformerLM`, batch_size < 1, or bits is
        not None, 8 or 4.
    """
    if not isinstance(model, TransformerLM):
        raise ValueError(f"init_kv_cache needs a TransformerLM, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_cache_bits(bits)
    kv_heads, head_dim = _lm_heads(model)
    shape = (batch_size, model.max_len, kv_heads, head_dim)
    if bits is None:
        entry = jnp.zeros(shape, model.dtype)
    else:
        spec = QuantSpec(bits=bits, axes=(0, 1, 2))
        scale = jnp.ones((*shape[:3], 1), jnp.float32)
        entry = QArray(qvalue=jnp.zeros(shape, spec.dtype), scale=scale, zero_point=None, spec=spec)
    blocks = {f"block_{i}": {"k": entry, "v": entry} for i in range(model.num_layers)}
    return {"index": jnp.zeros((), jnp.int32), **blocks}


class LMTiny(TransformerLM):
    """d_model 128, 4 blocks, 4 query / 2 key-value heads, SwiGLU 384, 256 positions, tied
    (about 0.8M params besides the embedding; trains on a CPU).
    """

    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = 2
    mlp_dim: int = 384
    max_len: int = 256


class LMSmall(TransformerLM):
    """d_model 256, 6 blocks, 8 heads (no grouping), SwiGLU 768, 512 positions, tied."""

    num_layers: int = 6
    d_model: int = 256
    num_heads: int = 8
    num_kv_heads: int | None = None
    mlp_dim: int = 768
    max_len: int = 512


class LMBase(TransformerLM):
    """d_model 768, 12 blocks, 12 heads (no grouping), SwiGLU 2048, 1024 positions, tied
    (GPT-2 small's width and depth).
    """

    num_layers: int = 12
    d_model: int = 768
    num_heads: int = 12
    num_kv_heads: int | None = None
    mlp_dim: int = 2048
    max_len: int = 1024


def _lm_param_count(model: TransformerLM) -> int:
    """V d + L (2 d + d H Dh + 2 d K Dh + H Dh d + 3 d m) + d [+ d V untied]."""
    kv_heads, head_dim = _lm_heads(model)
    d, heads, vocab = model.d_model, model.num_heads, model.num_classes
    attention_params = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    block = 2 * d + attention_params + 3 * d * model.mlp_dim
    head = 0 if model.tie_embeddings else d * vocab
    return vocab * d + model.num_layers * block + d + head


def _encoder_param_count(model: TransformerEncoder) -> int:
    """(vocab + max_len + types) d + 2 d + L (4 (d^2 + d) + 2 m d + m + d + 4 d) [+ C (d + 1)]."""
    d, mlp = model.d_model, model.mlp_dim
    embeddings = (model.vocab_size + model.max_len + model.type_vocab_size) * d + 2 * d
    layer = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * (2 * d)
    head = model.num_classes * (d + 1) if model.head else 0
    return embeddings + model.num_layers * layer + head


def transformer_param_count(model: TransformerLM | TransformerEncoder) -> int:
    """The number of parameters of a transformer, from its attributes alone.

    Language model (V vocabulary, d width, L blocks, H query and K key/value
    heads of Dh features, m SwiGLU width):
        V d + L (2 d + 2 d H Dh + 2 d K Dh + 3 d m) + d, plus d V when untied.
    Encoder (C classes, m MLP width, T positions, Y token types):
        (vocab + T + Y) d + 2 d + L (4 (d^2 + d) + 2 d m + m + 5 d), plus C (d + 1)
        for the head (none with head=False).

    Args:
      model: a `TransformerLM` or `TransformerEncoder` (or a named size).

    Returns:
      The parameter count, equal to `count_params` of the initialised params.

    Raises:
      ValueError: another kind of model.
    """
    if isinstance(model, TransformerLM):
        return _lm_param_count(model)
    if isinstance(model, TransformerEncoder):
        return _encoder_param_count(model)
    raise ValueError(
        f"transformer_param_count counts TransformerLM and TransformerEncoder, "
        f"got {type(model).__name__}"
    )


__all__ = [
    "EncoderSmall",
    "EncoderTiny",
    "LMBase",
    "LMSmall",
    "LMTiny",
    "TransformerEncoder",
    "TransformerLM",
    "init_kv_cache",
    "transformer_param_count",
]
