"""kdq.tasks.Classification against numpy: targets, metrics, evaluation sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.tasks import TASKS, Classification, Targets, get_task


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _batch(rng, batch=6, classes=5, mask=True):
    out = {
        "image": rng.normal(size=(batch, 4, 4, 1)).astype(np.float32),
        "label": rng.integers(0, classes, size=batch).astype(np.int32),
    }
    if mask:
        out["mask"] = np.array([True, True, False, True, False, True])[:batch]
    return out


def test_eval_sums_and_summary_match_numpy():
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    task = Classification()
    sums = jax.device_get(task.eval_sums(jnp.asarray(logits), task.targets(batch)))
    valid = batch["mask"]
    nll = -_log_softmax(logits.astype(np.float64))[np.arange(6), batch["label"]]
    correct = (logits.argmax(-1) == batch["label"]) & valid
    assert int(sums["count"]) == valid.sum() == 4
    assert int(sums["correct"]) == correct.sum()
    np.testing.assert_allclose(float(sums["loss_sum"]), nll[valid].sum(), rtol=1e-6)
    summary = task.summarize(sums)
    assert summary == {
        "accuracy": correct.sum() / 4,
        "loss": pytest.approx(nll[valid].sum() / 4, rel=1e-6),
    }


def test_targets_default_to_every_example_and_metrics_are_batch_means():
    rng = np.random.default_rng(1)
    batch = _batch(rng, mask=False)
    task = Classification()
    targets = task.targets(batch)
    assert isinstance(targets, Targets)
    np.testing.assert_array_equal(targets.where, np.ones(6, bool))
    np.testing.assert_array_equal(task.inputs(batch), batch["image"])
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    accuracy = float(task.metrics(jnp.asarray(logits), targets)["accuracy"])
    assert accuracy == np.mean(logits.argmax(-1) == batch["label"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"label": np.zeros((6, 1), np.int32)},
            r"batch\['label'\] must have shape \(B,\) = \(6,\)",
        ),
        ({"label": np.zeros(6, np.float32)}, "must hold integer class indices"),
        ({"mask": np.ones(5, bool)}, r"batch\['mask'\] must have shape \(6,\)"),
        ({"image": np.zeros((), np.float32)}, "must have a batch axis"),
    ],
)
def test_bad_batches_are_named(change, message):
    batch = {**_batch(np.random.default_rng(2)), **change}
    with pytest.raises(ValueError, match=message):
        Classification().check_batch(batch)


def test_a_missing_entry_lists_the_batch_entries():
    with pytest.raises(ValueError, match=r"no 'label' entry; its entries are \['image'\]"):
        Classification().check_batch({"image": np.zeros((2, 3))})


def test_logits_must_be_one_row_per_example():
    task = Classification()
    targets = task.targets({"label": np.zeros(4, np.int32)})
    task.check_logits(jnp.zeros((4, 10)), targets)
    with pytest.raises(ValueError, match=r"logits of shape \(B, num_classes\) = \(4, C\)"):
        task.check_logits(jnp.zeros((4, 3, 10)), targets)


def test_registry():
    assert isinstance(get_task("classification"), Classification)
    assert set(TASKS) == {"classification", "text_classification", "language_modeling"}
    with pytest.raises(ValueError, match="unknown task 'regression'; registered tasks"):
        get_task("regression")


def _lm_batch(rng, batch=3, length=5, vocab=7):
    tokens = rng.integers(0, vocab, size=(batch, length + 1)).astype(np.int32)
    token_mask = np.ones((batch, length), bool)
    token_mask[1, 3:] = False  # the padded tail of a document's last window
    return {"tokens": tokens, "token_mask": token_mask, "mask": np.array([True, True, False])}


def test_language_modeling_predicts_the_next_token_where_text_is_real():
    rng = np.random.default_rng(2)
    batch = _lm_batch(rng)
    task = get_task("language_modeling")
    np.testing.assert_array_equal(task.inputs(batch), batch["tokens"][:, :-1])
    targets = task.targets(batch)
    np.testing.assert_array_equal(targets.labels, batch["tokens"][:, 1:])
    expected_where = batch["token_mask"] & batch["mask"][:, None]
    np.testing.assert_array_equal(targets.where, expected_where)
    assert int(np.sum(expected_where)) == 5 + 3


def test_language_modeling_sums_give_nats_per_token_and_bits_per_byte():
    rng = np.random.default_rng(3)
    batch = _lm_batch(rng)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    task = get_task("language_modeling")
    targets = task.targets(batch)
    sums = jax.device_get(task.eval_sums(jnp.asarray(logits), targets))
    where = np.asarray(targets.where)
    labels = batch["tokens"][:, 1:]
    nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), labels[..., None], -1)[
        ..., 0
    ]
    nats = nll[where].mean()
    summary = task.summarize(sums)
    assert summary["loss"] == pytest.approx(nats, rel=1e-6)
    assert summary["bits_per_byte"] == pytest.approx(nats / np.log(2), rel=1e-6)
    assert summary["accuracy"] == pytest.approx((logits.argmax(-1) == labels)[where].mean())
    metrics = jax.device_get(task.metrics(jnp.asarray(logits), targets))
    assert float(metrics["bits_per_byte"]) == pytest.approx(nats / np.log(2), rel=1e-5)


def test_uniform_predictions_over_bytes_cost_eight_bits_per_byte():
    batch = _lm_batch(np.random.default_rng(4), vocab=256)
    task = get_task("language_modeling")
    sums = task.eval_sums(jnp.zeros((3, 5, 256)), task.targets(batch))
    assert task.summarize(jax.device_get(sums))["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.pop("token_mask"), "no 'token_mask' entry"),
        (lambda b: b.update(tokens=b["tokens"][:, :1]), r"shape \(B, T \+ 1\) with T >= 1"),
        (lambda b: b.update(tokens=b["tokens"].astype(np.float32)), "integer token ids"),
        (lambda b: b.update(token_mask=b["token_mask"][:, :-1]), "must be a bool array"),
        (lambda b: b.update(mask=np.ones(2, bool)), r"batch\['mask'\] must have shape \(3,\)"),
    ],
)
def test_language_modeling_names_the_bad_batch_entry(change, message):
    batch = _lm_batch(np.random.default_rng(5))
    change(batch)
    with pytest.raises(ValueError, match=message):
        get_task("language_modeling").check_batch(batch)


def test_language_modeling_refuses_logits_of_the_wrong_shape():
    batch = _lm_batch(np.random.default_rng(6))
    task = get_task("language_modeling")
    with pytest.raises(ValueError, match=r"\(B, T, vocab\) = \(3, 5, V\)"):
        task.check_logits(jnp.zeros((3, 7)), task.targets(batch))


def test_text_classification_reads_token_sequences():
    task = get_task("text_classification")
    batch = {"tokens": np.zeros((4, 9), np.int32), "label": np.arange(4, dtype=np.int32)}
    task.check_batch(batch)
    np.testing.assert_array_equal(task.inputs(batch), batch["tokens"])
    with pytest.raises(ValueError, match=r"batch\['tokens'\] must have a batch axis"):
        task.check_batch({"tokens": np.zeros((), np.int32), "label": np.zeros((), np.int32)})
