"""Autoregressive sampling from a `kdq.models.TransformerLM`, with its KV cache.

`generate` runs the prompt through the model in one cached call (prefill),
then one cached call per new token inside a `jax.lax.scan`, all under one
`jax.jit` (compiled once per model, prompt shape, token count and filter
settings; the temperature and the key are traced). `generate_uncached` is the
full-recompute reference: each new token reruns the model on the whole
(B, P + num_tokens) buffer (the positions not yet written hold 0, which the
causal mask keeps out of the logits read), so it needs no cache and one
compiled step serves every position.

Token i of the continuation is drawn with the i-th key of
`jax.random.split(key, num_tokens)` in both, from the logits of the last
position before it after the filters of `sample_logits`: divide by the
temperature, keep the top k, keep the nucleus of mass top_p.

`apply_fn(variables, tokens, cache=cache)` (cached) or `apply_fn(variables,
tokens)` (uncached) defaults to `model.apply`; pass e.g. a quantized forward.
Pass the same function object again to reuse the compiled loop.

`generate(..., kv_cache_bits=8)` (or 4) decodes with an integer KV cache
(`kdq.models.init_kv_cache(model, batch, bits=...)`): each token's keys and
values are stored with a float32 scale per (sequence, position, kv head) and
attention reads them dequantized.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kdq.models.transformer import check_cache_bits, init_kv_cache

STATIC = ("apply_fn", "num_tokens", "top_k", "top_p", "greedy")


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row and sets the others to -inf.

    kept_i = logits_i if logits_i >= the k-th largest logit of the row, else
    -inf (logits tied with the k-th largest are all kept).

    Args:
      logits: (..., V) logits.
      k: how many to keep, 1 <= k <= V.

    Returns:
      The filtered logits, same shape.
    """
    threshold = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter (Holtzman et al. 2020): keeps the most likely tokens of mass >= p.

    With the probabilities softmax(logits) sorted in decreasing order,
    pi_(1) >= pi_(2) >= ..., the kept set is the smallest prefix whose mass
    pi_(1) + ... + pi_(n) reaches p: token (j) is kept iff the mass before it,
    pi_(1) + ... + pi_(j-1), is below p, so the most likely token always is
    (and tokens tied with the last kept one are kept too). The others become -inf.

    Args:
      logits: (..., V) logits.
      p: the mass to reach, 0 < p <= 1.

    Returns:
      The filtered logits, same shape.
    """
    descending = -jnp.sort(-logits, axis=-1)
    probabilities = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probabilities, axis=-1) - probabilities
    kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _sample(logits, key, temperature, top_k, top_p, greedy):
    """`sample_logits` without the checks (traceable temperature)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


_compiled_sample = jax.jit(_sample, static_argnames=("top_k", "top_p", "greedy"))


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Draws one token per row of logits.

    greedy: argmax_i logits_i. Otherwise a draw from softmax(filtered), where
    filtered = top_p_filter(top_k_filter(logits / temperature, top_k), top_p),
    a filter set to None being skipped.

    Args:
      logits: (..., V) logits.
      key: a PRNG key (unused when greedy).
      temperature: finite, > 0; below 1 sharpens the distribution, above 1 flattens it.
      top_k: None, or keep the top_k most likely tokens (1 <= top_k <= V).
      top_p: None, or keep the nucleus of mass top_p (0 < top_p <= 1).
      greedy: take the most likely token.

    Returns:
      (...) int32 token ids.

    Raises:
      ValueError: a setting out of range.
    """
    _check_sampling(temperature, top_k, top_p, greedy, logits.shape[-1])
    return _compiled_sample(logits, key, temperature, top_k, top_p, greedy)


def _check_sampling(temperature: Any, top_k: Any, top_p: Any, greedy: bool, vocab: int) -> None:
    """Raises ValueError for sampling settings out of range (see `sample_logits`)."""
    number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not greedy and not (number and 0 < temperature < math.inf):
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r}; for argmax decoding "
            "pass greedy=True"
        )
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab
    ):
        raise ValueError(f"top_k must be None or an int in [1, vocabulary={vocab}], got {top_k!r}")
    is_float = isinstance(top_p, int | float) and not isinstance(top_p, bool)
    if top_p is not None and not (is_float and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _check_request(model: Any, prompt: Any, num_tokens: Any, settings: dict[str, Any]) -> jax.Array:
    """Checks a generation request; returns the prompt as int32.

    Raises:
      ValueError: a bad prompt, token count or sampling setting, or a prompt
        plus continuation longer than model.max_len.
    """
    max_len = getattr(model, "max_len", None)
    if max_len is None:
        raise ValueError(f"generation needs a model with max_len, got {type(model).__name__}")
    shape, dtype = getattr(prompt, "shape", None), getattr(prompt, "dtype", None)
    if shape is None or len(shape) != 2 or shape[1] < 1 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"prompt must be int token ids of shape (batch, length >= 1), got shape={shape} "
            f"dtype={dtype}"
        )
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
    if shape[1] + num_tokens > max_len:
        raise ValueError(
            f"prompt length {shape[1]} + num_tokens {num_tokens} exceeds the model's "
            f"max_len={max_len}; shorten the prompt or generate fewer tokens"
        )
    _check_sampling(**settings, vocab=model.num_classes)
    return jnp.asarray(prompt, jnp.int32)


@functools.partial(jax.jit, static_argnames=STATIC)
def _cached_loop(
    variables, prompt, cache, keys, temperature, *, apply_fn, num_tokens, top_k, top_p, greedy
):
    """Prefill, then `num_tokens - 1` one-token cached steps; (B, P + num_tokens) int32."""
    choose = functools.partial(
        _sample, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    logits, cache = apply_fn(variables, prompt, cache=cache)
    first = choose(logits[:, -1], keys[0])

    def step(carry, key):
        token, cache = carry
        logits, cache = apply_fn(variables, token[:, None], cache=cache)
        token = choose(logits[:, 0], key)
        return (token, cache), token

    _, rest = jax.lax.scan(step, (first, cache), keys[1:])
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=STATIC)
def _uncached_loop(
    variables, prompt, keys, temperature, *, apply_fn, num_tokens, top_k, top_p, greedy
):
    """`num_tokens` full forwards of the (B, P + num_tokens) buffer; the buffer filled."""
    choose = functools.partial(
        _sample, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    length = prompt.shape[1]
    tokens = jnp.pad(prompt, ((0, 0), (0, num_tokens)))

    def step(i, tokens):
        logits = apply_fn(variables, tokens)
        last = jax.lax.dynamic_index_in_dim(logits, length + i - 1, axis=1, keepdims=False)
        token = choose(last, keys[i])
        return jax.lax.dynamic_update_index_in_dim(tokens, token, length + i, axis=1)

    return jax.lax.fori_loop(0, num_tokens, step, tokens)


def _run(loop, model, variables, prompt, num_tokens, key, settings, apply_fn, cache_bits=None):
    """Checks the request and runs `loop`, passing it an empty KV cache if it is cached."""
    prompt = _check_request(model, prompt, num_tokens, settings)
    if loop is _cached_loop:
        cache = (init_kv_cache(model, prompt.shape[0], bits=cache_bits),)
    else:
        cache = ()
    temperature = jnp.float32(1.0 if settings["greedy"] else settings["temperature"])
    filters = {k: settings[k] for k in ("top_k", "top_p", "greedy")}
    keys = jax.random.split(key, num_tokens)
    apply_fn = model.apply if apply_fn is None else apply_fn
    arguments = (variables, prompt, *cache, keys, temperature)
    return loop(*arguments, apply_fn=apply_fn, num_tokens=num_tokens, **filters)


def generate(
    model: Any,
    variables: Any,
    prompt: jax.Array,
    *,
    num_tokens: int,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    apply_fn: Callable[..., Any] | None = None,
    kv_cache_bits: int | None = None,
) -> jax.Array:
    """Continues `prompt` by `num_tokens` sampled tokens, decoding with the KV cache.

    Args:
      model: a `kdq.models.TransformerLM` (its max_len, vocabulary and cache shape).
      variables: the model's variables ({"params": ...}), as `apply_fn` takes them.
      prompt: (B, P) int token ids, P >= 1.
      num_tokens: tokens to add, >= 1, with P + num_tokens <= model.max_len.
      key: PRNG key of the draws.
      temperature: see `sample_logits`.
      top_k: see `sample_logits`.
      top_p: see `sample_logits`.
      greedy: see `sample_logits`.
      apply_fn: `apply_fn(variables, tokens, cache=cache) -> (logits, cache)`;
        None: `model.apply`.
      kv_cache_bits: None for a float cache in the model dtype; 8 or 4 for
        an integer cache (`kdq.models.init_kv_cache`).

    Returns:
      (B, P + num_tokens) int32: the prompt, then the new tokens.

    Raises:
      ValueError: a bad prompt or setting, a sequence longer than max_len, or
        kv_cache_bits not None, 8 or 4.
    """
    check_cache_bits(kv_cache_bits, "kv_cache_bits")
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return _run(
        _cached_loop, model, variables, prompt, num_tokens, key, settings, apply_fn, kv_cache_bits
    )


def generate_uncached(
    model: Any,
    variables: Any,
    prompt: jax.Array,
    *,
    num_tokens: int,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    apply_fn: Callable[..., Any] | None = None,
) -> jax.Array:
    """`generate` without a cache: every token reruns the model on the whole sequence.

    The reference for `generate` (same draws for the same key) and the baseline
    of the cache benchmark.

    Args:
      model: the model (its max_len and vocabulary).
      variables: the model's variables.
      prompt: (B, P) int token ids, P >= 1.
      num_tokens: tokens to add, >= 1, with P + num_tokens <= model.max_len.
      key: PRNG key of the draws.
      temperature: see `sample_logits`.
      top_k: see `sample_logits`.
      top_p: see `sample_logits`.
      greedy: see `sample_logits`.
      apply_fn: `apply_fn(variables, tokens) -> logits`; None: `model.apply`.

    Returns:
      (B, P + num_tokens) int32: the prompt, then the new tokens.

    Raises:
      ValueError: a bad prompt or setting, or a sequence longer than max_len.
    """
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return _run(_uncached_loop, model, variables, prompt, num_tokens, key, settings, apply_fn)
