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
    assert set(TASKS) == {"classification"}
    with pytest.raises(ValueError, match="unknown task 'regression'; registered tasks"):
        get_task("regression")
