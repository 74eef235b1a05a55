"""Figure 7: tokens per second of KV-cache generation against full recomputation.

`lm_tiny` (vocabulary 256, random init, float32) continues a 1-token prompt
to its whole context of 256 tokens (255 new tokens, batch 1), sampling at
temperature 1, with `kdq.generate.generate` (one cached prefill call, then one
cached one-token call per token in a `lax.scan`) and with
`kdq.generate.generate_uncached` (each token reruns the model on the whole
256-token buffer: the cost of a decoder without a cache at full context).
Each call is one whole generation, jitted and warmed up; the two are sampled
round-robin (`common.time_interleaved`). Reported: new tokens per second of
each (255 over the call time), ms per call, and the speedup uncached time /
cached time per round (goal: at least 5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from experiments.bench import common
from experiments.bench.common import calls_per_sample, goal, ms, ratio, summary
from kdq.generate import generate, generate_uncached
from kdq.models import create_model

MODEL, VOCAB, BATCH, PROMPT, CONTEXT = "lm_tiny", 256, 1, 1, 256
NEW_TOKENS = CONTEXT - PROMPT
LIMIT = 5.0


def tokens_per_second(name: str):
    """`summary` of NEW_TOKENS / seconds per call of `name`, one value per sample."""
    return lambda samples, numbers: summary([NEW_TOKENS / seconds for seconds in samples[name]])


def figures(args):
    """One figure: cached and uncached generation of the same tokens."""
    model = create_model(MODEL, num_classes=VOCAB, max_len=CONTEXT)
    prompt = jnp.ones((BATCH, PROMPT), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), prompt)
    options = dict(num_tokens=NEW_TOKENS, key=jax.random.PRNGKey(1))
    calls = {
        "cached": functools.partial(generate, model, variables, prompt, **options),
        "uncached": functools.partial(generate_uncached, model, variables, prompt, **options),
    }
    speedup = ratio("uncached", "cached")
    row = {
        "model": MODEL,
        "batch": BATCH,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "cached_tokens_per_s": tokens_per_second("cached"),
        "uncached_tokens_per_s": tokens_per_second("uncached"),
        "cached_ms": ms("cached"),
        "uncached_ms": ms("uncached"),
        "speedup": speedup,
        "calls_per_sample": calls_per_sample(list(calls)),
    }
    text = f"KV-cache speedup over recomputation, {MODEL} at {CONTEXT} tokens"
    yield common.Figure(calls, [row], [goal(text, speedup, LIMIT, at_most=False)])


BENCHMARK = common.Benchmark(
    "lm_generation",
    "KV-cache vs full-recompute generation, tokens per second",
    figures,
    settings={
        "model": f"kdq.models.create_model({MODEL!r}, num_classes={VOCAB})",
        "batch": BATCH,
        "prompt": PROMPT,
        "context": CONTEXT,
        "sampling": "temperature 1, no top-k / top-p",
    },
    tables="Figure 7: {description}",
    repeats=5,
)

if __name__ == "__main__":
    BENCHMARK.main()
