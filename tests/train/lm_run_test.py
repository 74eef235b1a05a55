"""Language-model runs end to end on a small text directory: train, distil, quantize, sample."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sample
from kdq.generate import generate
from kdq.models import create_model
from kdq.train import build, default_config, train_and_evaluate
from kdq.train.lm import GeneratedBatches, check_sequence_models

pytestmark = pytest.mark.slow

TINY_LM = {"num_layers": 1, "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64}
WORDS = ("to be or not to be ", "that is the question ", "whether tis nobler ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six small files of word patterns, split by file into train / validation / test."""
    directory = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(6):
        text = "".join(WORDS[j] for j in rng.integers(0, len(WORDS), size=40))
        (directory / f"part{i}.txt").write_text(text)
    return str(directory)


def _lm_config(corpus, max_len=64, **options):
    config = default_config()
    config.dataset = f"text:{corpus}"
    config.task = "language_modeling"
    config.seq_len = 32
    config.model.name = "transformer_lm"
    config.model.options = {**TINY_LM, "max_len": max_len, **options}
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_steps = 30
    config.log_every = 10
    config.checkpoint_every = 30
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 2
    config.progress = False
    return config


def _distilled(corpus, teacher_workdir, losses):
    config = _lm_config(corpus)
    config.teacher.name = "transformer_lm"
    config.teacher.options = {**TINY_LM, "max_len": 64}
    config.teacher.workdir = teacher_workdir
    config.losses = losses
    return config


@pytest.fixture(scope="module")
def teacher_run(corpus, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("runs") / "teacher")
    return workdir, train_and_evaluate(_lm_config(corpus), workdir)


def _bits_per_byte(model, variables, documents, seq_len):
    """Next-byte cross-entropy in bits over every byte of `documents`, recomputed window by window."""
    total, count = 0.0, 0
    for document in documents:
        text = np.frombuffer(b"\n" + document, np.uint8).astype(np.int32)
        for start in range(0, len(text) - 1, seq_len):
            window = text[start : start + seq_len + 1]
            logits = np.asarray(model.apply(variables, jnp.asarray(window[None, :-1])))[0]
            shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
            count += len(window) - 1
    return total / count / math.log(2)


def test_teacher_reports_bits_per_byte_of_every_held_out_byte(corpus, teacher_run):
    workdir, report = teacher_run
    assert report["task"] == "language_modeling"
    assert report["test_bits_per_byte"] < 6.0  # uniform bytes cost 8
    assert report["generate_tokens_per_second"] > 0
    config = _lm_config(corpus)
    setup = build(config)
    model, _, variables = sample.load_language_model(workdir)
    documents = [
        bytes(int(t) for t in w["tokens"][1:][w["token_mask"]])
        for w in (setup.dataset.test[i] for i in range(len(setup.dataset.test)))
    ]
    # Reassemble the test files from their windows (each window after the first
    # continues the one before), then score them independently of the pipeline.
    joined = b"".join(documents)
    files = sorted(open(os.path.join(corpus, name), "rb").read() for name in os.listdir(corpus))
    held_out = [f for f in files if f in joined]
    assert held_out and sum(map(len, held_out)) == len(joined)
    expected = _bits_per_byte(model, variables, held_out, config.seq_len)
    assert report["test_bits_per_byte"] == pytest.approx(expected, rel=1e-4)


def test_sampling_a_run_is_greedy_decoding_of_its_model(teacher_run):
    workdir, _ = teacher_run
    model, apply_fn, variables = sample.load_language_model(workdir)
    assert apply_fn is None
    prompt = jnp.asarray([list(b"\nto be")], jnp.int32)
    tokens = np.asarray(
        generate(model, variables, prompt, num_tokens=3, key=jax.random.PRNGKey(0), greedy=True)
    )
    expected = list(b"\nto be")
    for _ in range(3):
        logits = model.apply(variables, jnp.asarray([expected]))
        expected.append(int(jnp.argmax(logits[0, -1])))
    assert tokens[0].tolist() == expected


def test_distillation_with_divergences_and_token_features(corpus, teacher_run, tmp_path):
    teacher_workdir, teacher = teacher_run
    losses = {
        "ce": {"weight": 0.5},
        "kd": {"kind": "reverse_kl", "weight": 0.5},
        "hidden": {"weight": 0.1, "student": "block_0/mlp/down", "teacher": "block_0/mlp/down"},
        "relation": {
            "kind": "attention_relation",
            "weight": 0.1,
            "student": "block_0/attn/q",
            "teacher": "block_0/attn/q",
        },
    }
    report = train_and_evaluate(_distilled(corpus, teacher_workdir, losses), str(tmp_path / "kd"))
    assert report["test_bits_per_byte"] < 8.0
    metrics = [json.loads(line) for line in open(tmp_path / "kd" / "metrics.jsonl")]
    logged = {k for m in metrics for k in m}
    assert {"train/loss/kd", "train/loss/hidden", "train/loss/relation"} <= logged


def test_on_policy_batches_are_the_students_continuations(corpus, teacher_run, tmp_path):
    teacher_workdir, _ = teacher_run
    config = _distilled(corpus, teacher_workdir, {"jsd": {"weight": 1.0, "beta": 0.5}})
    config.generated.source = "student"
    config.generated.fraction = 0.5
    config.generated.prompt_len = 8
    report = train_and_evaluate(config, str(tmp_path / "gkd"))
    assert report["test_bits_per_byte"] < 8.0
    setup = build(config)
    generated = GeneratedBatches.from_config(config, setup)
    draws = [generated.is_generated(step) for step in range(1, 2001)]
    assert draws == [generated.is_generated(step) for step in range(1, 2001)]
    assert 0.45 < np.mean(draws) < 0.55


def test_generated_batches_keep_the_prompt_and_the_shapes(corpus, teacher_run):
    teacher_workdir, _ = teacher_run
    config = _distilled(corpus, teacher_workdir, {"kd": {"kind": "forward_kl"}})
    config.generated.source = "teacher"
    config.generated.fraction = 1.0
    config.generated.prompt_len = 8
    setup = build(config)
    from kdq.data import train_batches

    batch = next(train_batches(setup.dataset, batch_size=4, seed=0, num_threads=0))
    out = GeneratedBatches.from_config(config, setup)(1, None, setup.teacher_variables, batch)
    assert out["tokens"].shape == batch["tokens"].shape and out["tokens"].dtype == np.int32
    real = batch["token_mask"][:, 7]
    np.testing.assert_array_equal(out["tokens"][real, :8], batch["tokens"][real, :8])
    assert out["token_mask"][real].all()
    assert (out["tokens"][real, 8:] != batch["tokens"][real, 8:]).any()


def test_quantized_lm_with_grouped_weights_and_per_token_activations(corpus, tmp_path):
    config = _lm_config(corpus)
    config.quant.weight_bits = 4
    config.quant.group_size = 16
    config.quant.weight_regex = ".*(attn|mlp)/.*kernel"
    config.quant.act_bits = 8
    config.quant.act_regex = ".*(attn|mlp)/.*"
    config.quant.act_per_token = True
    report = train_and_evaluate(config, str(tmp_path / "qat"))
    assert report["weight_bits"] == 4 and report["act_bits"] == 8
    assert abs(report["test_bits_per_byte_int"] - report["test_bits_per_byte"]) < 0.05
    model, apply_fn, _ = sample.load_language_model(str(tmp_path / "qat"))
    assert apply_fn is not None


def test_a_sequence_longer_than_the_model_reads_is_refused(corpus, tmp_path):
    config = _lm_config(corpus, max_len=16)
    with pytest.raises(ValueError, match=r"config.seq_len=32 is longer than config.model"):
        train_and_evaluate(config, str(tmp_path / "long"))
    assert not os.path.exists(tmp_path / "long" / "config.json")


def test_teacher_and_student_vocabularies_must_agree(corpus, teacher_run):
    teacher_workdir, _ = teacher_run
    config = _distilled(corpus, teacher_workdir, {"kd": {"kind": "forward_kl"}})
    setup = build(config)
    other = create_model("transformer_lm", num_classes=300, **TINY_LM, max_len=64)
    with pytest.raises(ValueError, match=r"teacher's vocabulary \(300 tokens\) differs"):
        check_sequence_models(config, dataclasses.replace(setup, teacher=other))


def test_generated_text_needs_a_language_model(tmp_path):
    config = default_config()
    config.generated.source = "student"
    config.seq_len = 64
    config.num_steps = 2
    config.optimizer.warmup_steps = 0
    config.progress = False
    with pytest.raises(ValueError, match="config.generated.source='student' generates text"):
        train_and_evaluate(config, str(tmp_path / "digits"))
