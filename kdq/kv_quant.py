"""What quantizing the KV cache costs: next-token loss read through the cache, and its size.

`cached_lm_loss` scores held-out windows as `kdq.tasks.LanguageModeling` does
(inputs x = tokens[:, :-1], targets y = tokens[:, 1:], a target counting where
token_mask holds), but runs each window as one prefill into a fresh cache,
float or integer (`kdq.models.init_kv_cache(model, batch, bits=...)`). Over
the N counted targets

    L = -1/N sum log softmax(z_t)[y_t]  nats per token,   L / ln 2  bits per byte

(one byte per token, `kdq.data.text`). A prefill attends over the entries it
has just stored, quantized if the cache is, and a token's stored entry does
not depend on later tokens, so L is the loss of token-by-token decoding with
that cache, computed in one call per batch of windows.

`kv_cache_bytes` is the memory a cache holds: float entries their itemsize
per value; integer entries `bits` per value plus a float32 scale per
(sequence, position, kv head), e.g. (8 Dh + 32) / (32 Dh) of a float32 cache
at 8 bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdq.models.transformer import TransformerLM, check_cache_bits, init_kv_cache
from kdq.quant.qarray import QArray


@functools.partial(jax.jit, static_argnames="apply_fn")
def _window_sums(variables, inputs, targets, where, cache, *, apply_fn):
    """(sum of the counted targets' cross-entropies, their count) of one prefill."""
    logits, _ = apply_fn(variables, inputs, cache=cache)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(where, loss, 0.0)), jnp.sum(where)


def _check_windows(model: TransformerLM, tokens: Any, token_mask: Any) -> tuple[Any, Any]:
    """tokens (N, T + 1) and token_mask (N, T) as numpy int32 and bool.

    Raises:
      ValueError: bad shapes or dtypes, T > max_len, or no target counted.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"tokens must be int token windows of shape (N, T + 1) with T >= 1, got shape "
            f"{tokens.shape} dtype {tokens.dtype}"
        )
    count, length = tokens.shape[0], tokens.shape[1] - 1
    if length > model.max_len:
        raise ValueError(
            f"windows of {length} inputs (tokens of shape {tokens.shape}) exceed the model's "
            f"max_len={model.max_len}; cut them to at most max_len + 1 tokens"
        )
    if token_mask is None:
        token_mask = np.ones((count, length), bool)
    token_mask = np.asarray(token_mask)
    if token_mask.shape != (count, length) or token_mask.dtype != np.bool_:
        raise ValueError(
            f"token_mask must be a bool array of shape (N, T) = {(count, length)} for tokens of "
            f"shape {tokens.shape}, got {token_mask.dtype} of shape {token_mask.shape}"
        )
    if not token_mask.any():
        raise ValueError("token_mask counts no target; the loss of zero tokens is undefined")
    return tokens.astype(np.int32), token_mask


def cached_lm_loss(
    model: TransformerLM,
    variables: Any,
    tokens: Any,
    token_mask: Any | None = None,
    *,
    kv_cache_bits: int | None = None,
    batch_size: int = 16,
    apply_fn: Callable[..., Any] | None = None,
) -> dict[str, float]:
    """Next-token cross-entropy of token windows, each run as a prefill into a fresh cache.

    The windows go through in batches of `batch_size` (the last one filled
    with uncounted copies of the first window), so one compiled prefill
    serves them all.

    Args:
      model: a `kdq.models.TransformerLM`.
      variables: its variables ({"params": ...}), as `apply_fn` takes them.
      tokens: (N, T + 1) int token windows, T <= model.max_len.
      token_mask: (N, T) bool, True where target tokens[:, t + 1] counts
        (`kdq.data.TokenFeatures`); None: every target.
      kv_cache_bits: None for a float cache in the model dtype; 8 or 4 for
        an integer cache.
      batch_size: windows per prefill, >= 1.
      apply_fn: `apply_fn(variables, tokens, cache=cache) -> (logits, cache)`;
        None: `model.apply`.

    Returns:
      {"nats_per_token": L, "bits_per_byte": L / ln 2, "tokens": N counted}.

    Raises:
      ValueError: bad windows or mask, a mask that counts nothing, a bad
        batch_size or kv_cache_bits, or a model that is not a `TransformerLM`.
    """
    if not isinstance(model, TransformerLM):
        raise ValueError(f"cached_lm_loss needs a TransformerLM, got {type(model).__name__}")
    check_cache_bits(kv_cache_bits, "kv_cache_bits")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tokens, token_mask = _check_windows(model, tokens, token_mask)
    batch_size = min(batch_size, len(tokens))
    padding = -len(tokens) % batch_size
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], padding, axis=0)])
    token_mask = np.concatenate([token_mask, np.zeros((padding, token_mask.shape[1]), bool)])
    cache = init_kv_cache(model, batch_size, bits=kv_cache_bits)
    apply_fn = model.apply if apply_fn is None else apply_fn
    loss_sum, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        window = tokens[start : start + batch_size]
        where = token_mask[start : start + batch_size]
        total, counted = _window_sums(
            variables, window[:, :-1], window[:, 1:], where, cache, apply_fn=apply_fn
        )
        loss_sum, count = loss_sum + float(total), count + int(counted)
    nats = loss_sum / count
    return {"nats_per_token": nats, "bits_per_byte": nats / math.log(2), "tokens": count}


def kv_cache_bytes(cache: dict[str, Any]) -> int:
    """Bytes a KV cache stores: its k and v entries, the index left out.

    Float entries count their itemsize per value; `QArray` entries
    `QArray.nbytes`: `bits` per integer (densely packed) plus 4 bytes per scale.

    Args:
      cache: a cache from `kdq.models.init_kv_cache` (or a cached call).

    Returns:
      The total over every block's k and v.

    Raises:
      ValueError: `cache` has no "block_i" entries.
    """
    blocks = [value for name, value in cache.items() if name.startswith("block_")]
    if not blocks:
        raise ValueError(
            f"cache must hold 'block_i' entries, got {sorted(cache)}; make it with init_kv_cache"
        )
    total = 0
    for block in blocks:
        for entry in (block["k"], block["v"]):
            total += entry.nbytes if isinstance(entry, QArray) else int(entry.nbytes)
    return total
