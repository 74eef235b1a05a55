"""Sampling filters against numpy, and KV-cache generation against full recomputation."""

import functools

import jax
import numpy as np
import pytest

from kdq.generate import generate, generate_uncached, sample_logits, top_k_filter, top_p_filter
from kdq.models import create_model

VOCAB, PROMPT, NEW = 13, 3, 5
SIZES = dict(num_layers=1, d_model=16, num_heads=4, num_kv_heads=2, mlp_dim=24, max_len=12)


@pytest.fixture(scope="module")
def lm():
    """A 1-block GQA LM with random (not initial) params, and a (2, PROMPT) prompt."""
    model = create_model("transformer_lm", num_classes=VOCAB, **SIZES)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, (2, PROMPT)).astype(np.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), prompt)
    variables = jax.tree_util.tree_map(
        lambda s: (rng.standard_normal(s.shape) * 0.5 + (s.ndim == 1)).astype(np.float32), shapes
    )
    return model, variables, prompt


@functools.cache
def _forward(model):
    """The uncached forward under jax.jit, kept for the module."""
    return jax.jit(model.apply)


def _np_top_k(logits, k):
    threshold = np.sort(logits, axis=-1)[..., ::-1][..., k - 1 : k]
    return np.where(logits >= threshold, logits, -np.inf)


def _np_top_p(logits, p):
    """Keeps, per row, the smallest set of most likely tokens whose probability is >= p."""
    out = np.full_like(logits, -np.inf)
    for row, z in enumerate(logits.astype(np.float64)):
        probabilities = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        order = np.argsort(-probabilities)
        # (float64 rounding may leave the total a hair below p = 1)
        masses = [probabilities[order[:n]].sum() for n in range(1, len(z) + 1)]
        size = next(n for n, mass in enumerate(masses, 1) if mass >= p - 1e-12)
        out[row, order[:size]] = z[order[:size]]
    return out


# ---------------------------------------------------------------- filters and sampling


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_filter_matches_numpy(k):
    logits = np.random.default_rng(k).standard_normal((4, 10)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(top_k_filter(logits, k)), _np_top_k(logits, k))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_filter_matches_numpy(p):
    logits = 2 * np.random.default_rng(7).standard_normal((4, 10)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(top_p_filter(logits, p)), _np_top_p(logits, p))


def test_top_p_keeps_the_most_likely_token_even_when_it_alone_exceeds_p():
    logits = np.log(np.array([[0.7, 0.2, 0.1]], np.float32))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.6)))
    np.testing.assert_array_equal(kept, [[True, False, False]])
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.8)))  # 0.7 < 0.8 <= 0.7 + 0.2
    np.testing.assert_array_equal(kept, [[True, True, False]])


def test_greedy_and_top_k_1_take_the_argmax():
    logits = np.random.default_rng(1).standard_normal((6, 9)).astype(np.float32)
    expected = logits.argmax(axis=-1)
    greedy = sample_logits(logits, jax.random.PRNGKey(0), greedy=True)
    np.testing.assert_array_equal(np.asarray(greedy), expected)
    for seed in range(3):
        top1 = sample_logits(logits, jax.random.PRNGKey(seed), top_k=1, temperature=3.0)
        np.testing.assert_array_equal(np.asarray(top1), expected)


def test_samples_follow_the_tempered_top_k_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    draws = 20_000
    tokens = sample_logits(
        np.tile(logits, (draws, 1)), jax.random.PRNGKey(0), temperature=2.0, top_k=3
    )
    frequencies = np.bincount(np.asarray(tokens), minlength=5) / draws
    tempered = np.exp(logits[:3] / 2.0)
    expected = np.concatenate([tempered / tempered.sum(), [0.0, 0.0]])
    np.testing.assert_allclose(frequencies, expected, atol=0.015)  # about 4 sigma


# ---------------------------------------------------------------- generation


def test_greedy_generation_is_the_argmax_of_the_uncached_forward_at_each_step(lm):
    model, variables, prompt = lm
    tokens = np.asarray(
        generate(model, variables, prompt, num_tokens=NEW, key=jax.random.PRNGKey(0), greedy=True)
    )
    assert tokens.shape == (2, PROMPT + NEW) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[:, :PROMPT], prompt)
    # Causality: the forward of the whole sequence gives each step's logits at once.
    logits = np.asarray(_forward(model)(variables, tokens))
    np.testing.assert_array_equal(tokens[:, PROMPT:], logits[:, PROMPT - 1 : -1].argmax(-1))
    uncached = generate_uncached(
        model, variables, prompt, num_tokens=NEW, key=jax.random.PRNGKey(1), greedy=True
    )
    np.testing.assert_array_equal(np.asarray(uncached), tokens)


def test_sampling_is_reproducible_and_matches_the_uncached_reference(lm):
    model, variables, prompt = lm
    settings = dict(num_tokens=NEW, temperature=1.5, top_k=8, top_p=0.95)
    first = generate(model, variables, prompt, key=jax.random.PRNGKey(3), **settings)
    again = generate(model, variables, prompt, key=jax.random.PRNGKey(3), **settings)
    other = generate(model, variables, prompt, key=jax.random.PRNGKey(4), **settings)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    reference = generate_uncached(model, variables, prompt, key=jax.random.PRNGKey(3), **settings)
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(first))


def test_generation_runs_the_given_apply_fn(lm):
    model, variables, prompt = lm
    favoured = 7

    def biased(variables, tokens, cache):  # e.g. a quantized forward
        logits, cache = model.apply(variables, tokens, cache=cache)
        return logits.at[..., favoured].add(1e3), cache

    tokens = generate(
        model, variables, prompt, num_tokens=2, key=jax.random.PRNGKey(0), apply_fn=biased
    )
    np.testing.assert_array_equal(np.asarray(tokens)[:, PROMPT:], favoured)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0; .*greedy=True"),
        (dict(top_k=0), r"top_k must be None or an int in \[1, vocabulary=13\], got 0"),
        (dict(top_k=14), r"top_k must be None or an int in \[1, vocabulary=13\], got 14"),
        (dict(top_p=0.0), r"top_p must be None or a number in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be None or a number in \(0, 1\], got 1.5"),
        (dict(num_tokens=10), r"prompt length 3 \+ num_tokens 10 exceeds the model's max_len=12"),
        (dict(num_tokens=0), r"num_tokens must be an int >= 1, got 0"),
        (dict(prompt=np.zeros((2, 3), np.float32)), r"prompt must be int token ids of shape"),
        (dict(prompt=np.zeros((3,), np.int32)), r"prompt must be int token ids of shape"),
    ],
)
def test_generation_refuses_bad_requests(lm, change, message):
    model, variables, prompt = lm
    request = dict(prompt=prompt, num_tokens=2, key=jax.random.PRNGKey(0)) | change
    for run in (generate, generate_uncached):
        with pytest.raises(ValueError, match=message):
            run(model, variables, **request)


def test_greedy_ignores_the_temperature_and_other_models_are_refused(lm):
    model, variables, prompt = lm
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -1.0"):
        sample_logits(np.zeros((1, 3), np.float32), jax.random.PRNGKey(0), temperature=-1.0)
    tokens = sample_logits(np.eye(3, dtype=np.float32), None, temperature=0.0, greedy=True)
    np.testing.assert_array_equal(np.asarray(tokens), [0, 1, 2])
    with pytest.raises(ValueError, match=r"generation needs a model with max_len, got MLP"):
        generate(create_model("mlp", num_classes=3), {}, prompt, num_tokens=1, key=None)
