"""The transformer LM and encoder against numpy references written from their definitions."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.distill.taps import apply_with_taps
from kdq.models import create_model, init_kv_cache, transformer_param_count

VOCAB = 13
LM_SIZES = dict(num_layers=2, d_model=16, num_heads=4, num_kv_heads=2, mlp_dim=24, max_len=12)
# The second LM: one block, untied, multi-head attention, 6-feature heads, its own RoPE
# base and epsilon.
MHA_OPTIONS = dict(
    num_layers=1,
    tie_embeddings=False,
    num_kv_heads=None,
    head_dim=6,
    rope_base=500.0,
    norm_eps=1e-3,
)
ENCODER_SIZES = dict(vocab_size=20, num_layers=1, d_model=16, num_heads=2, mlp_dim=24, max_len=8)

# Every model is applied through jax.jit, on few shapes: compiling dominates the run time.


def _tokens(shape, vocab=VOCAB, seed=0, low=0):
    """Random int32 token ids (numpy: slicing them costs no compilation)."""
    return np.random.default_rng(seed).integers(low, vocab, shape).astype(np.int32)


def _random_variables(model, tokens, seed=0):
    """Variables shaped as `model.init`'s: N(0, 0.5^2) entries, scales 1 + N(0, 0.1^2)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        return jnp.asarray(0.5 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _compiled(model):
    """`model.apply` under jax.jit, kept for the whole module (a dropped jit wrapper drops
    its compilations, and equal models share one).
    """
    return jax.jit(model.apply)


def _size(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def gqa():
    """The tied GQA LM (4 query heads, 2 key/value heads), its variables and (2, 9) tokens."""
    model = create_model("transformer_lm", num_classes=VOCAB, **LM_SIZES)
    tokens = _tokens((2, 9))
    return model, _random_variables(model, tokens), tokens


@pytest.fixture(scope="module")
def mha():
    """The untied MHA LM of `MHA_OPTIONS`, its variables and (2, 9) tokens."""
    model = create_model("transformer_lm", num_classes=VOCAB, **{**LM_SIZES, **MHA_OPTIONS})
    tokens = _tokens((2, 9), seed=1)
    return model, _random_variables(model, tokens, seed=1), tokens


# ---------------------------------------------------------------- numpy references


def np_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def np_layer_norm(x, scale, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_rope(x, base):
    """x (T, heads, D): pair i with i + D/2, rotate by angle t * base^(-2i/D)."""
    length, _, dim = x.shape
    half = dim // 2
    angle = np.arange(length)[:, None, None] * base ** (-2.0 * np.arange(half) / dim)
    first, second = x[..., :half], x[..., half:]
    cos, sin = np.cos(angle), np.sin(angle)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def np_attention(q, k, v, visible):
    """q (T, H, D), k and v (S, K, D); query head h reads key/value head h // (H / K)."""
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    out = np.zeros_like(q)
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = np.where(visible, q[:, h] @ k[:, g].T / math.sqrt(dim), -np.inf)
        out[:, h] = np_softmax(scores) @ v[:, g]
    return out


def np_silu(z):
    return z / (1 + np.exp(-z))


def np_gelu(z, approximate):
    if approximate:
        return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def np_lm(params, tokens, *, heads, kv_heads, head_dim, eps, base, tied):
    """Logits (T, V) of one sequence: pre-norm blocks, RoPE, causal GQA, SwiGLU."""
    p = jax.tree_util.tree_map(np.asarray, params)
    x = p["embed"]["embedding"][tokens]
    length = len(tokens)
    causal = np.tril(np.ones((length, length), bool))
    for i in range(len([name for name in p if name.startswith("block_")])):
        block = p[f"block_{i}"]
        h = np_rms_norm(x, block["attn_norm"]["scale"], eps)
        a = block["attn"]
        q = np_rope((h @ a["q"]["kernel"]).reshape(length, heads, head_dim), base)
        k = np_rope((h @ a["k"]["kernel"]).reshape(length, kv_heads, head_dim), base)
        v = (h @ a["v"]["kernel"]).reshape(length, kv_heads, head_dim)
        x = x + np_attention(q, k, v, causal).reshape(length, -1) @ a["o"]["kernel"]
        h = np_rms_norm(x, block["mlp_norm"]["scale"], eps)
        m = block["mlp"]
        x = x + (np_silu(h @ m["gate"]["kernel"]) * (h @ m["up"]["kernel"])) @ m["down"]["kernel"]
    x = np_rms_norm(x, p["final_norm"]["scale"], eps)
    return x @ (p["embed"]["embedding"].T if tied else p["head"]["kernel"])


def np_encoder(params, tokens, types, *, heads, eps, approximate, pooling, pad_id):
    """Class logits of one sequence: BERT post-norm layers, masked attention and pooling."""
    p = jax.tree_util.tree_map(np.asarray, params)
    length = len(tokens)
    x = p["embed"]["embedding"][tokens] + p["pos_embed"]["embedding"][:length]
    if "type_embed" in p:
        x = x + p["type_embed"]["embedding"][types]
    x = np_layer_norm(x, p["embed_norm"]["scale"], p["embed_norm"]["bias"], eps)
    keep = np.ones(length, bool) if pad_id is None else tokens != pad_id
    for i in range(len([name for name in p if name.startswith("layer_")])):
        layer = p[f"layer_{i}"]

        def dense(module, z):
            return z @ module["kernel"] + module["bias"]

        a, m = layer["attn"], layer["mlp"]
        split = [dense(a[n], x).reshape(length, heads, -1) for n in ("q", "k", "v")]
        attended = dense(a["o"], np_attention(*split, keep[None, :]).reshape(length, -1))
        norm = layer["attn_norm"]
        x = np_layer_norm(x + attended, norm["scale"], norm["bias"], eps)
        hidden = dense(m["down"], np_gelu(dense(m["up"], x), approximate))
        norm = layer["mlp_norm"]
        x = np_layer_norm(x + hidden, norm["scale"], norm["bias"], eps)
    pooled = x[0] if pooling == "cls" else x[keep].mean(axis=0)
    return pooled @ p["head"]["kernel"] + p["head"]["bias"]


# ---------------------------------------------------------------- language model


@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_lm_matches_the_numpy_reference(which, request):
    model, variables, tokens = request.getfixturevalue(which)
    logits = np.asarray(_compiled(model)(variables, tokens))
    assert logits.shape == (2, 9, VOCAB) and logits.dtype == np.float32
    options = {**LM_SIZES, **(MHA_OPTIONS if which == "mha" else {})}
    settings = dict(
        heads=4,
        kv_heads=options["num_kv_heads"] or 4,
        head_dim=options.get("head_dim", 4),
        eps=options.get("norm_eps", 1e-6),
        base=options.get("rope_base", 10000.0),
        tied=options.get("tie_embeddings", True),
    )
    for b in range(2):
        expected = np_lm(variables["params"], np.asarray(tokens[b]), **settings)
        np.testing.assert_allclose(logits[b], expected, rtol=1e-5, atol=1e-5)


def test_lm_params_follow_the_contract_paths_and_the_closed_form_count():
    model = create_model("lm_tiny", num_classes=256)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    flat = {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    }
    assert flat["embed/embedding"] == (256, 128)
    assert flat["block_3/attn/q/kernel"] == (128, 128)
    assert flat["block_3/attn/k/kernel"] == flat["block_3/attn/v/kernel"] == (128, 64)
    assert flat["block_3/attn/o/kernel"] == (128, 128)
    assert flat["block_0/mlp/gate/kernel"] == flat["block_0/mlp/up/kernel"] == (128, 384)
    assert flat["block_0/mlp/down/kernel"] == (384, 128)
    assert flat["block_0/attn_norm/scale"] == flat["final_norm/scale"] == (128,)
    assert len(flat) == 1 + 4 * 9 + 1  # tied: no head
    # V d + L (2 d + 2 d^2 + 2 d (d / 2) + 3 d m) + d, by hand for lm_tiny.
    assert _size(shapes) == transformer_param_count(model) == 820_352


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("transformer_lm", dict(LM_SIZES, tie_embeddings=True)),
        ("transformer_lm", dict(LM_SIZES, tie_embeddings=False, num_kv_heads=None)),
        ("transformer_lm", dict(LM_SIZES, num_kv_heads=1, head_dim=10, num_layers=3)),
        ("transformer_encoder", dict(num_layers=2, d_model=16, num_heads=2, mlp_dim=24)),
        ("encoder_tiny", dict(type_vocab_size=3, vocab_size=40, max_len=9, num_layers=1)),
        ("encoder_tiny", dict(vocab_size=40, max_len=9, num_layers=1, head=False)),
    ],
)
def test_param_count_closed_form_matches_the_initialised_model(name, options):
    model = create_model(name, num_classes=VOCAB, **options)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    assert transformer_param_count(model) == _size(shapes)


def test_changing_a_token_leaves_earlier_logits_unchanged(gqa):
    model, variables, tokens = gqa
    changed = tokens.copy()
    changed[:, 4] = (tokens[:, 4] + 1) % VOCAB
    apply = _compiled(model)
    before, after = np.asarray(apply(variables, tokens)), np.asarray(apply(variables, changed))
    np.testing.assert_array_equal(before[:, :4], after[:, :4])
    assert np.abs(before[:, 4:] - after[:, 4:]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_cached_prefill_and_steps_match_the_full_forward(which, request):
    model, variables, tokens = request.getfixturevalue(which)
    apply = _compiled(model)
    full = np.asarray(apply(variables, tokens))
    cache = init_kv_cache(model, 2)
    for start, stop in [(0, 4), (4, 8), (8, 9)]:  # prefill, a 4-token chunk, one token
        logits, cache = apply(variables, tokens[:, start:stop], cache=cache)
        np.testing.assert_allclose(logits, full[:, start:stop], rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == 9
    kv_heads, head_dim = (4, 6) if which == "mha" else (2, 4)
    assert set(cache) == {"index", *(f"block_{i}" for i in range(model.num_layers))}
    last = jax.tree_util.tree_map(np.asarray, cache[f"block_{model.num_layers - 1}"])
    assert last["k"].shape == (2, LM_SIZES["max_len"], kv_heads, head_dim)
    np.testing.assert_array_equal(last["v"][:, 9:], 0)
    assert np.abs(last["v"][:, :9]).max(axis=(0, 2, 3)).min() > 0


def test_a_cached_step_reads_the_cache(gqa):
    model, variables, tokens = gqa
    apply = _compiled(model)
    _, cache = apply(variables, tokens[:, :4], cache=init_kv_cache(model, 2))
    step, _ = apply(variables, tokens[:, 4:5], cache=cache)
    empty = {**init_kv_cache(model, 2), "index": cache["index"]}
    blind, _ = apply(variables, tokens[:, 4:5], cache=empty)
    assert np.abs(np.asarray(step) - np.asarray(blind)).max() > 1e-3


def test_bfloat16_lm_computes_in_bfloat16_and_returns_float32_logits(gqa):
    model, variables, tokens = gqa
    half = create_model("transformer_lm", num_classes=VOCAB, dtype="bfloat16", **LM_SIZES)
    lowered = jax.jit(half.apply).lower(variables, tokens)
    assert "bf16" in lowered.as_text()
    logits = np.asarray(lowered.compile()(variables, tokens))
    assert logits.dtype == np.float32
    reference = np.asarray(_compiled(model)(variables, tokens))
    scale = np.abs(reference).max()
    np.testing.assert_allclose(logits, reference, atol=0.05 * scale)
    cache = init_kv_cache(half, 2)
    assert cache["block_0"]["k"].dtype == jnp.bfloat16
    cached, new_cache = jax.eval_shape(
        lambda v, t, c: half.apply(v, t, cache=c), variables, tokens, cache
    )
    assert cached.dtype == jnp.float32 and new_cache["block_0"]["v"].dtype == jnp.bfloat16


def test_projections_and_blocks_are_tappable_by_path(gqa):
    model, variables, tokens = gqa
    taps = ["block_1/attn/q", "block_1/attn/k", "block_0/mlp/gate", "block_1"]
    features = jax.eval_shape(
        lambda v, t: apply_with_taps(model, v, t, taps=taps)[1], variables, tokens
    )
    assert {tap: features[tap].shape for tap in taps} == {
        "block_1/attn/q": (2, 9, 16),
        "block_1/attn/k": (2, 9, 8),
        "block_0/mlp/gate": (2, 9, 24),
        "block_1": (2, 9, 16),
    }


def test_lm_refuses_bad_inputs_and_sizes(gqa):
    model, variables, tokens = gqa

    def trace(*args, **kwargs):
        return jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)

    with pytest.raises(ValueError, match=r"tokens must be an int array of shape \(batch, length\)"):
        trace(tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"tokens must be an int array"):
        trace(tokens[0])
    with pytest.raises(ValueError, match=r"sequence length 13 must lie in \[1, max_len=12\]"):
        trace(_tokens((1, 13)))
    full = {**init_kv_cache(model, 2), "index": jnp.int32(11)}
    with pytest.raises(ValueError, match=r"holds 11 positions and 2 more exceed max_len=12"):
        model.apply(variables, tokens[:, :2], cache=full)
    with pytest.raises(ValueError, match=r"make it with init_kv_cache\(model, batch\)"):
        trace(tokens, cache={"index": 0})
    bad = [
        (dict(num_kv_heads=3), r"num_kv_heads=3 must divide num_heads=4"),
        (dict(d_model=18), r"num_heads=4 must divide d_model=18, or give head_dim"),
        (dict(head_dim=5), r"head_dim=5 must be even"),
    ]
    for options, message in bad:
        broken = create_model("transformer_lm", num_classes=VOCAB, **{**LM_SIZES, **options})
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(broken.init, jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match=r"init_kv_cache needs a TransformerLM, got MLP"):
        init_kv_cache(create_model("mlp", num_classes=3), 1)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        init_kv_cache(model, 0)
    with pytest.raises(ValueError, match=r"counts TransformerLM and TransformerEncoder, got MLP"):
        transformer_param_count(create_model("mlp", num_classes=3))


def test_named_sizes_have_their_documented_defaults_and_take_options():
    tiny, small, base = (
        create_model(n, num_classes=256) for n in ("lm_tiny", "lm_small", "lm_base")
    )
    assert (tiny.d_model, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads) == (128, 4, 4, 2)
    assert (tiny.mlp_dim, tiny.max_len, tiny.tie_embeddings) == (384, 256, True)
    assert (small.d_model, small.num_layers, small.num_heads, small.mlp_dim) == (256, 6, 8, 768)
    assert (base.d_model, base.num_layers, base.num_heads, base.mlp_dim) == (768, 12, 12, 2048)
    assert (small.max_len, base.max_len) == (512, 1024)
    assert create_model("lm_tiny", num_classes=5, num_layers=1).num_layers == 1
    encoder = create_model("encoder_small", num_classes=2)
    assert (encoder.d_model, encoder.num_layers) == (256, 4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(pooling="max"), r"option pooling='max' must be 'cls' or 'mean'"),
        (dict(norm_eps=0.0), r"option norm_eps=0.0 must be a finite number > 0"),
        (dict(pad_id=-1), r"option pad_id=-1 must be None or a token id >= 0"),
        (dict(approximate_gelu=1), r"option approximate_gelu=1 must be a bool"),
        (dict(num_layers=0), r"option num_layers=0 must be made of ints >= 1"),
    ],
)
def test_create_model_refuses_bad_transformer_options(options, message):
    with pytest.raises(ValueError, match=message):
        create_model("transformer_encoder", num_classes=2, **options)


def test_create_model_accepts_zero_pad_id_no_token_types_and_derived_heads():
    encoder = create_model("transformer_encoder", num_classes=2, pad_id=0, type_vocab_size=0)
    assert (encoder.pad_id, encoder.type_vocab_size) == (0, 0)
    lm = create_model(
        "lm_tiny", num_classes=9, num_kv_heads=None, rope_base=1e4, tie_embeddings=False
    )
    assert lm.num_kv_heads is None and lm.rope_base == 1e4
    with pytest.raises(ValueError, match=r"option rope_base=-1.0 must be a finite number > 0"):
        create_model("lm_tiny", num_classes=9, rope_base=-1.0)


# ---------------------------------------------------------------- encoder

PADDED = dict(pooling="mean", pad_id=0, norm_eps=0.1, approximate_gelu=True)


def _encoder_tokens():
    """(2, 6) tokens 1..19, the second row padded (0) from position 4."""
    tokens = _tokens((2, 6), vocab=20, low=1)
    tokens[1, 4:] = 0
    return tokens


@pytest.mark.parametrize(
    "options",
    [dict(pooling="cls", type_vocab_size=2), PADDED],
    ids=["cls-types-erf", "mean-padded-eps-tanh"],
)
def test_encoder_matches_the_numpy_bert_layer(options):
    model = create_model("transformer_encoder", num_classes=3, **{**ENCODER_SIZES, **options})
    tokens, types = _encoder_tokens(), _tokens((2, 6), vocab=2, seed=1)
    variables = _random_variables(model, tokens)
    given = types if options.get("type_vocab_size") else None
    logits = np.asarray(_compiled(model)(variables, tokens, given))
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    settings = dict(
        heads=2,
        eps=options.get("norm_eps", 1e-12),
        approximate=options.get("approximate_gelu", False),
        pooling=options["pooling"],
        pad_id=options.get("pad_id"),
    )
    for b in range(2):
        t = np.asarray(tokens[b])
        expected = np_encoder(variables["params"], t, np.asarray(types[b]), **settings)
        np.testing.assert_allclose(logits[b], expected, rtol=1e-5, atol=1e-5)


def test_mean_pooling_ignores_padding_tokens():
    model = create_model("transformer_encoder", num_classes=3, **{**ENCODER_SIZES, **PADDED})
    short = _encoder_tokens()
    long = np.pad(short, ((0, 0), (0, 2)))  # two more padding tokens
    variables = _random_variables(model, long)
    logits = {
        name: np.asarray(_compiled(model)(variables, t))
        for name, t in [("short", short), ("long", long)]
    }
    np.testing.assert_allclose(logits["short"], logits["long"], atol=1e-6)
    unpadded = short.copy()
    unpadded[1, 5] = 7  # a real token where there was padding
    changed = np.asarray(_compiled(model)(variables, unpadded))
    assert np.abs(changed[1] - logits["short"][1]).max() > 1e-3


def test_encoder_refuses_bad_inputs():
    model = create_model("transformer_encoder", num_classes=3, **ENCODER_SIZES)
    tokens = _tokens((1, 4), vocab=20)
    variables = _random_variables(model, tokens)

    def trace(*args):
        return jax.eval_shape(lambda v: model.apply(v, *args), variables)

    with pytest.raises(ValueError, match=r"tokens must be an int array of shape \(batch, length\)"):
        trace(tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"sequence length 9 must lie in \[1, max_len=8\]"):
        trace(_tokens((1, 9), vocab=20))
    with pytest.raises(ValueError, match=r"token_types given but type_vocab_size=0"):
        trace(tokens, np.zeros_like(tokens))
    odd = create_model("transformer_encoder", num_classes=3, **{**ENCODER_SIZES, "num_heads": 3})
    with pytest.raises(ValueError, match=r"num_heads=3 must divide d_model=16"):
        jax.eval_shape(odd.init, jax.random.PRNGKey(0), tokens)
