"""The integer KV cache against numpy: stored levels and scales, logits, and the cached loss."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.generate import generate, sample_logits
from kdq.kv_quant import cached_lm_loss, kv_cache_bytes
from kdq.models import create_model, init_kv_cache

VOCAB, LENGTH = 256, 10
SIZES = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=16)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
# A reference level k / s must lie this far from a rounding tie (in levels), so that float32
# noise of the code under test (about 1e-5 levels) cannot round it the other way.
TIE_MARGIN = 1e-4
KEY = jax.random.PRNGKey(0)


def _qmax(bits):
    return 2 ** (bits - 1) - 1


@functools.cache
def _compiled(model):
    """`model.apply` under jax.jit, kept for the module."""
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def lm():
    """The 2-block GQA LM, variables N(0, 0.2^2) (norm scales 1 + N(0, 0.1^2)), (2, LENGTH)
    tokens. (Attention scores then spread by about 1 around their mean, and float32 logits
    stay within 5e-6 of float64.)
    """
    model = create_model("transformer_lm", num_classes=VOCAB, **SIZES)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)).astype(np.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        spread = rng.standard_normal(leaf.shape)
        value = 1 + 0.1 * spread if path[-1].key == "scale" else 0.2 * spread
        return jnp.asarray(value, jnp.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes), tokens


# ---------------------------------------------------------------- numpy references


def np_quantize(x, bits):
    """Levels and scales of x (..., D) per leading index: s = max_d |x| / qmax (1 where 0),
    q = round_half_even(x / s) clipped to [-qmax - 1, qmax]; checks x / s is off every tie.
    """
    qmax = _qmax(bits)
    scale = np.abs(x).max(axis=-1, keepdims=True) / np.asarray(qmax, x.dtype)
    scale = np.where(scale > 0, scale, np.asarray(1, x.dtype))
    levels = x / scale
    distance = np.abs(np.abs(levels - np.floor(levels)) - 0.5)
    assert distance.min() > TIE_MARGIN, "a value lies on a rounding tie; change the seed"
    return np.clip(np.round(levels), -qmax - 1, qmax), scale


def np_rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, base=10000.0):
    """x (T, heads, D): feature i pairs with i + D/2, rotated by t * base^(-2i/D)."""
    length, _, dim = x.shape
    half = dim // 2
    angle = np.arange(length)[:, None, None] * base ** (-2.0 * np.arange(half) / dim)
    first, second = x[..., :half], x[..., half:]
    cos, sin = np.cos(angle), np.sin(angle)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def np_attention(q, k, v):
    """Causal GQA: q (T, H, D), k and v (T, K, D); head h reads key/value head h // (H / K)."""
    length, heads, dim = q.shape
    causal = np.tril(np.ones((length, length), bool))
    out = np.zeros_like(q)
    for h in range(heads):
        g = h // (heads // k.shape[1])
        scores = np.where(causal, q[:, h] @ k[:, g].T / math.sqrt(dim), -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[:, h] = weights / weights.sum(axis=-1, keepdims=True) @ v[:, g]
    return out


def np_quantized_kv_lm(params, tokens, bits):
    """Logits (T, V) of one sequence (float64) whose attention reads the keys and values
    quantized per (position, kv head), and each block's (levels, scales) of k and v.
    """
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][tokens]
    length, stored = len(tokens), []
    for i in range(SIZES["num_layers"]):
        block = p[f"block_{i}"]
        h = np_rms_norm(x, block["attn_norm"]["scale"])
        a = block["attn"]
        q = np_rope((h @ a["q"]["kernel"]).reshape(length, HEADS, HEAD_DIM))
        k = np_rope((h @ a["k"]["kernel"]).reshape(length, KV_HEADS, HEAD_DIM))
        v = (h @ a["v"]["kernel"]).reshape(length, KV_HEADS, HEAD_DIM)
        (k_levels, k_scale), (v_levels, v_scale) = np_quantize(k, bits), np_quantize(v, bits)
        stored.append({"k": (k_levels, k_scale), "v": (v_levels, v_scale)})
        attended = np_attention(q, k_levels * k_scale, v_levels * v_scale)
        x = x + attended.reshape(length, -1) @ a["o"]["kernel"]
        h = np_rms_norm(x, block["mlp_norm"]["scale"])
        m = block["mlp"]
        gate = h @ m["gate"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ m["up"]["kernel"])) @ m["down"]["kernel"]
    x = np_rms_norm(x, p["final_norm"]["scale"])
    return x @ p["embed"]["embedding"].T, stored


def np_masked_nats(logits, targets, where):
    """-1/N sum over counted targets of log softmax(logits)[target], in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return -picked[where].sum() / where.sum()


# ---------------------------------------------------------------- stored entries and logits


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_levels_and_scales_quantize_the_float_cache_of_the_same_prefill(lm, bits):
    model, variables, tokens = lm
    apply = _compiled(model)
    _, floats = apply(variables, tokens, cache=init_kv_cache(model, 2))
    _, integers = apply(variables, tokens, cache=init_kv_cache(model, 2, bits=bits))
    assert int(integers["index"]) == LENGTH
    for name in ("k", "v"):
        entry = integers["block_0"][name]
        assert entry.qvalue.dtype == (jnp.int8 if bits == 8 else jnp.int4)
        assert entry.qvalue.shape == (2, SIZES["max_len"], KV_HEADS, HEAD_DIM)
        assert entry.scale.dtype == jnp.float32 and entry.zero_point is None
        assert entry.scale.shape == (2, SIZES["max_len"], KV_HEADS, 1)
        levels, scale = np_quantize(np.asarray(floats["block_0"][name])[:, :LENGTH], bits)
        stored = np.asarray(entry.qvalue).astype(np.int32)
        np.testing.assert_array_equal(stored[:, :LENGTH], levels)
        np.testing.assert_allclose(np.asarray(entry.scale)[:, :LENGTH], scale, rtol=1e-6)
        assert np.abs(stored[:, :LENGTH]).max() == _qmax(bits)  # the absmax maps to qmax
        np.testing.assert_array_equal(stored[:, LENGTH:], 0)  # not written yet
        np.testing.assert_array_equal(np.asarray(entry.scale)[:, LENGTH:], 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_logits_through_the_integer_cache_match_numpy_attention_over_dequantized_kv(lm, bits):
    model, variables, tokens = lm
    logits, cache = _compiled(model)(variables, tokens, cache=init_kv_cache(model, 2, bits=bits))
    for b in range(2):
        expected, stored = np_quantized_kv_lm(variables["params"], tokens[b], bits)
        np.testing.assert_allclose(np.asarray(logits[b]), expected, rtol=1e-5, atol=1e-5)
        for i, block in enumerate(stored):  # every block's entries, not only the first
            for name, (levels, scale) in block.items():
                entry = cache[f"block_{i}"][name]
                got = np.asarray(entry.qvalue[b, :LENGTH]).astype(np.int32)
                np.testing.assert_array_equal(got, levels)
                np.testing.assert_allclose(entry.scale[b, :LENGTH], scale, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, None])
def test_prefill_loss_equals_the_loss_of_token_by_token_decoding(lm, bits):
    model, variables, _ = lm
    windows = np.random.default_rng(2).integers(0, VOCAB, (3, LENGTH + 1)).astype(np.int32)
    token_mask = np.ones((3, LENGTH), bool)
    token_mask[1, 6:] = False  # a short last window of a document
    token_mask[2, :2] = False
    # batch_size 2: the second batch is one window and a filler that must not count.
    result = cached_lm_loss(model, variables, windows, token_mask, kv_cache_bits=bits, batch_size=2)
    apply, cache, steps = _compiled(model), init_kv_cache(model, 3, bits=bits), []
    for t in range(LENGTH):
        logits, cache = apply(variables, windows[:, t : t + 1], cache=cache)
        steps.append(np.asarray(logits[:, 0]))
    expected = np_masked_nats(np.stack(steps, axis=1), windows[:, 1:], token_mask)
    assert result["tokens"] == token_mask.sum() == 24
    np.testing.assert_allclose(result["nats_per_token"], expected, rtol=1e-5)
    np.testing.assert_allclose(result["bits_per_byte"], expected / math.log(2), rtol=1e-5)
    if bits is not None:  # the integer cache is not the float one
        floats = cached_lm_loss(model, variables, windows, token_mask, batch_size=2)
        assert abs(floats["nats_per_token"] - result["nats_per_token"]) > 1e-6


# ---------------------------------------------------------------- accuracy and generation


def test_int8_cache_changes_logits_a_little_and_the_float_cache_is_unchanged(lm):
    model, _, tokens = lm
    variables = model.init(jax.random.PRNGKey(0), tokens)  # the initial (trained-from) model
    apply = _compiled(model)
    full = np.asarray(apply(variables, tokens))
    floats, float_cache = apply(variables, tokens, cache=init_kv_cache(model, 2))
    np.testing.assert_allclose(np.asarray(floats), full, rtol=1e-5, atol=1e-6)
    default, explicit = init_kv_cache(model, 2), init_kv_cache(model, 2, bits=None)
    assert jax.tree_util.tree_structure(default) == jax.tree_util.tree_structure(explicit)
    assert default["block_0"]["k"].dtype == jnp.float32
    assert float_cache["block_1"]["v"].shape == (2, SIZES["max_len"], KV_HEADS, HEAD_DIM)
    integers, _ = apply(variables, tokens, cache=init_kv_cache(model, 2, bits=8))
    error = np.linalg.norm(np.asarray(integers) - full) / np.linalg.norm(full)
    assert 0 < error < 2e-2


def test_generation_with_the_int8_cache_follows_its_logits(lm):
    model, variables, tokens = lm
    prompt, new = tokens[:, :3], 5
    greedy = np.asarray(
        generate(model, variables, prompt, num_tokens=new, key=KEY, greedy=True, kv_cache_bits=8)
    )
    np.testing.assert_array_equal(greedy[:, :3], prompt)
    # A prefill through an int8 cache gives every step's int8-cache logits at once.
    logits, _ = _compiled(model)(variables, greedy, cache=init_kv_cache(model, 2, bits=8))
    np.testing.assert_array_equal(greedy[:, 3:], np.asarray(logits)[:, 2:-1].argmax(-1))

    settings = dict(temperature=1.5, top_k=40)
    key = jax.random.PRNGKey(3)
    sampled = generate(
        model, variables, prompt, num_tokens=new, key=key, kv_cache_bits=8, **settings
    )
    apply, keys = _compiled(model), jax.random.split(key, new)
    logits, cache = apply(variables, prompt, cache=init_kv_cache(model, 2, bits=8))
    expected = [prompt]
    for i in range(new):
        token = np.asarray(sample_logits(logits[:, -1], keys[i], **settings))
        expected.append(token[:, None])
        logits, cache = apply(variables, token[:, None], cache=cache)
    np.testing.assert_array_equal(np.asarray(sampled), np.concatenate(expected, axis=1))


def test_cache_bytes_follow_the_closed_form_and_bfloat16_reads_stay_int8(lm):
    model, variables, tokens = lm
    values = 2 * SIZES["num_layers"] * 2 * SIZES["max_len"] * KV_HEADS * HEAD_DIM  # k, v
    scales = values // HEAD_DIM
    assert kv_cache_bytes(init_kv_cache(model, 2)) == 4 * values
    assert kv_cache_bytes(init_kv_cache(model, 2, bits=8)) == values + 4 * scales
    assert kv_cache_bytes(init_kv_cache(model, 2, bits=4)) == values // 2 + 4 * scales
    half = create_model("transformer_lm", num_classes=VOCAB, dtype="bfloat16", **SIZES)
    logits, cache = jax.eval_shape(
        lambda v, c: half.apply(v, tokens, cache=c), variables, init_kv_cache(half, 2, bits=8)
    )
    assert logits.dtype == jnp.float32 and cache["block_1"]["k"].qvalue.dtype == jnp.int8


# ---------------------------------------------------------------- bad input


def test_bad_cache_widths_and_windows_are_refused(lm):
    model, variables, tokens = lm
    for bits in (3, 16, 0, True, 8.0, "8"):
        with pytest.raises(ValueError, match=r"bits must be None .* or one of \(4, 8\)"):
            init_kv_cache(model, 2, bits=bits)
    with pytest.raises(ValueError, match=r"kv_cache_bits must be None .*, got kv_cache_bits=2"):
        generate(model, variables, tokens[:, :3], num_tokens=1, key=KEY, kv_cache_bits=2)
    windows = tokens[:, :5]
    bad = [
        (dict(kv_cache_bits=16), r"kv_cache_bits must be None"),
        (dict(tokens=windows[0]), r"tokens must be int token windows of shape \(N, T \+ 1\)"),
        (dict(tokens=windows.astype(np.float32)), r"tokens must be int token windows"),
        (dict(tokens=np.zeros((1, 18), np.int32)), r"windows of 17 inputs .* max_len=16"),
        (dict(token_mask=np.ones((2, 5), bool)), r"token_mask must be a bool array of shape"),
        (dict(token_mask=np.ones((2, 4), np.int32)), r"token_mask must be a bool array"),
        (dict(token_mask=np.zeros((2, 4), bool)), r"token_mask counts no target"),
        (dict(batch_size=0), r"batch_size must be an int >= 1, got 0"),
    ]
    for change, message in bad:
        request = dict(tokens=windows) | change
        with pytest.raises(ValueError, match=message):
            cached_lm_loss(model, variables, **request)
    with pytest.raises(ValueError, match=r"cached_lm_loss needs a TransformerLM, got MLP"):
        cached_lm_loss(create_model("mlp", num_classes=3), variables, windows)
    with pytest.raises(ValueError, match=r"cache must hold 'block_i' entries"):
        kv_cache_bytes({"index": 0})
