"""The MiniLM distillation experiment: layer copying, its loss against closed forms, its report."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax
import pytest

from experiments import distill_minilm, readme_tables
from kdq.models.encoder import TransformerEncoder

REPORT = os.path.join(readme_tables.ROOT, "experiments", "results", "distill_minilm_report.json")
BEGIN, END = "<!-- minilm-distill-table:begin -->", "<!-- minilm-distill-table:end -->"


def test_layer_map_spreads_the_student_over_the_teacher_ending_at_its_last_layer():
    assert distill_minilm.layer_map(6, 3) == [1, 3, 5]
    assert distill_minilm.layer_map(6, 2) == [2, 5]
    assert distill_minilm.layer_map(6, 6) == [0, 1, 2, 3, 4, 5]


class _Encoder:
    """The attributes of a `PretrainedEncoder` that the experiment reads."""

    def __init__(self, module, variables):
        self.module, self.variables = module, variables


@pytest.fixture(scope="module")
def tiny():
    teacher = TransformerEncoder(
        num_classes=0,
        vocab_size=50,
        num_layers=4,
        d_model=24,
        num_heads=4,
        mlp_dim=32,
        max_len=16,
        type_vocab_size=2,
        pooling="mean",
        pad_id=0,
        head=False,
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(6, 16)).astype(np.int32)
    ids[:, 11:] = 0  # padding
    variables = teacher.init(jax.random.PRNGKey(0), ids)
    return _Encoder(teacher, variables), ids


def test_student_copies_the_mapped_layers_and_embeddings(tiny):
    encoder, ids = tiny
    student, variables, mapping = distill_minilm.student_from_teacher(encoder, 2)
    assert student.num_layers == 2 and mapping == [1, 3]
    params, teacher_params = variables["params"], encoder.variables["params"]
    assert set(params) == {k for k in teacher_params if not k.startswith("layer_")} | {
        "layer_0",
        "layer_1",
    }
    for i, m in enumerate(mapping):
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, params[f"layer_{i}"], teacher_params[f"layer_{m}"]
        )
    same, same_variables, _ = distill_minilm.student_from_teacher(encoder, 4)
    np.testing.assert_array_equal(
        same.apply(same_variables, ids), encoder.module.apply(encoder.variables, ids)
    )


def _step_metrics(encoder, student, params, ids):
    tx = optax.sgd(0.0)
    step = distill_minilm.make_step(student, encoder.module, tx, relation_weight=1.0)
    _, _, metrics = step(params, tx.init(params), encoder.variables, ids)
    return {k: float(v) for k, v in metrics.items()}


def test_loss_is_zero_for_a_copy_and_the_embedding_term_is_two_minus_two_cosines(tiny):
    encoder, ids = tiny
    same, same_variables, _ = distill_minilm.student_from_teacher(encoder, 4)
    metrics = _step_metrics(encoder, same, same_variables["params"], ids)
    assert metrics["embedding_mse"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["relation"] == pytest.approx(0.0, abs=1e-6)

    student, variables, _ = distill_minilm.student_from_teacher(encoder, 1)
    metrics = _step_metrics(encoder, student, variables["params"], ids)
    s = np.asarray(student.apply(variables, ids), np.float64)
    t = np.asarray(encoder.module.apply(encoder.variables, ids), np.float64)
    cosine = np.sum(s * t, 1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)
    assert metrics["embedding_mse"] == pytest.approx(np.mean(2 - 2 * cosine), rel=1e-4)
    assert metrics["relation"] > 1e-4
    assert metrics["loss"] == pytest.approx(metrics["embedding_mse"] + metrics["relation"])


def test_padding_tokens_do_not_change_the_loss(tiny):
    encoder, ids = tiny
    student, variables, _ = distill_minilm.student_from_teacher(encoder, 1)
    short = _step_metrics(encoder, student, variables["params"], ids[:, :11])
    padded = _step_metrics(encoder, student, variables["params"], ids)
    for name in ("embedding_mse", "relation"):
        assert padded[name] == pytest.approx(short[name], rel=1e-4)


@pytest.fixture(scope="module")
def report():
    with open(REPORT) as f:
        return json.load(f)


def test_readme_distillation_table_is_the_committed_report(report):
    with open(readme_tables.README) as f:
        _, block, _ = readme_tables.split_readme(f.read(), BEGIN, END)
    assert block == f"```\n{distill_minilm.format_table(report)}\n```"


def test_committed_report_is_a_selection_on_validation_with_sane_figures(report):
    log = report["log"]
    best = max(log, key=lambda entry: entry["val_mean_cosine"])
    assert report["distilled"]["step"] == best["step"]
    assert report["distilled"]["val_mean_cosine"] == pytest.approx(best["val_mean_cosine"])
    assert report["layer_map"] == distill_minilm.layer_map(6, report["student_layers"])
    chosen = max(report["sweep"], key=lambda run: run["val_mean_cosine"])
    assert (chosen["learning_rate"], chosen["step"]) == (report["learning_rate"], best["step"])
    for figures in (report["copied"], report["distilled"]):
        for split in ("val", "test"):
            assert -1 <= figures[f"{split}_min_cosine"] <= figures[f"{split}_mean_cosine"] <= 1
    assert report["size_ratio"] == pytest.approx(
        report["student_params"] / report["teacher_params"]
    )
    assert report["speed"]["teacher_ms"] > 0 and report["speed"]["student_ms"] > 0
