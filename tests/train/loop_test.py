import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import digits_kd, digits_qat_kd, digits_student, digits_teacher
from kdq.train import NonFiniteLossError, train_and_evaluate
from kdq.train import loop as loop_lib

pytestmark = pytest.mark.slow


def _small(config, steps=20, **changes):
    config.num_steps = steps
    config.batch_size = 32
    config.log_every = 5
    config.checkpoint_every = 10
    config.optimizer.warmup_steps = min(2, steps - 1)
    config.progress = False
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train_and_evaluate(_small(digits_teacher.get_config(), steps=10), workdir)
    return workdir


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_loss_decreases_over_50_steps_on_digits(tmp_path):
    config = _small(digits_student.get_config(), steps=50)
    report = train_and_evaluate(config, str(tmp_path))
    losses = [r["train/loss"] for r in _read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < 0.85 * losses[0]
    assert report["test_accuracy"] > 0.5
    assert os.path.isdir(tmp_path / "tensorboard")
    assert any(
        name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard")
    )


@pytest.mark.parametrize("module", [digits_teacher, digits_student, digits_kd, digits_qat_kd])
def test_every_config_trains_a_step_under_mock_data(module, tmp_path, teacher_workdir):
    config = _small(module.get_config(), steps=2)
    config.teacher.workdir = teacher_workdir
    with tfds.testing.mock_data(num_examples=64):
        report = train_and_evaluate(config, str(tmp_path))
    assert report["steps"] == 2
    assert 0.0 <= report["test_accuracy"] <= 1.0
    with open(tmp_path / "report.json") as f:
        assert json.load(f)["checkpoint_bytes"] == report["checkpoint_bytes"] > 0


def _params(workdir):
    path = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(path) if d.isdigit())
    from kdq.checkpoint import StateCheckpoints

    manager = StateCheckpoints(path, keep=2, every=1)
    try:
        return step, manager._manager.restore(step)
    finally:
        manager.close()


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
    tmp_path, monkeypatch, teacher_workdir
):
    config = _small(digits_qat_kd.get_config(), steps=30)
    config.teacher.workdir = teacher_workdir
    full = train_and_evaluate(config, str(tmp_path / "full"))

    real_train_batches = loop_lib.train_batches

    def dying_after_23(*args, **kwargs):
        for i, batch in enumerate(real_train_batches(*args, **kwargs)):
            if i == 23:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(loop_lib, "train_batches", dying_after_23)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(loop_lib, "train_batches", real_train_batches)
    resumed = train_and_evaluate(config, str(tmp_path / "resumed"))

    step_full, state_full = _params(tmp_path / "full")
    step_resumed, state_resumed = _params(tmp_path / "resumed")
    assert step_full == step_resumed == 30
    jax.tree_util.tree_map(np.testing.assert_array_equal, state_full, state_resumed)
    assert full["test_accuracy"] == resumed["test_accuracy"]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = _small(digits_student.get_config(), steps=20)
    real_train_batches = loop_lib.train_batches

    def poisoned_from_12(*args, **kwargs):
        for i, batch in enumerate(real_train_batches(*args, **kwargs)):
            if i >= 12:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(loop_lib, "train_batches", poisoned_from_12)
    with pytest.raises(
        NonFiniteLossError, match=r"NaN/inf at step 13.*last good checkpoint \(step 10\)"
    ):
        train_and_evaluate(config, str(tmp_path))
    step, state = _params(tmp_path)
    assert step == 10
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


def test_same_seed_same_numbers(tmp_path):
    a = train_and_evaluate(_small(digits_student.get_config(), steps=10), str(tmp_path / "a"))
    b = train_and_evaluate(_small(digits_student.get_config(), steps=10), str(tmp_path / "b"))
    assert a["test_loss"] == b["test_loss"]


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="no_such_dataset"):
        train_and_evaluate(
            _small(digits_student.get_config(), dataset="no_such_dataset"), str(tmp_path)
        )


def test_unknown_model_name(tmp_path):
    config = _small(digits_student.get_config())
    config.model.name = "transformer9000"
    with pytest.raises(ValueError, match="unknown model name='transformer9000'"):
        train_and_evaluate(config, str(tmp_path))


def test_unknown_loss_name(tmp_path):
    config = _small(digits_student.get_config())
    config.losses = {"ce": {"weight": 1.0}, "kdd": {"weight": 1.0}}
    with pytest.raises(ValueError, match="unknown kind='kdd'"):
        train_and_evaluate(config, str(tmp_path))


def test_feature_path_that_does_not_exist(tmp_path, teacher_workdir):
    config = _small(digits_kd.get_config())
    config.teacher.workdir = teacher_workdir
    config.losses = {"ce": {"weight": 1.0}, "rkd": {"student": "Dense_7", "teacher": "Dense_0"}}
    with pytest.raises(ValueError, match=r"'Dense_7' must match exactly one submodule.*Dense_0"):
        train_and_evaluate(config, str(tmp_path))


def test_missing_teacher_checkpoint(tmp_path):
    config = _small(digits_kd.get_config())
    config.teacher.workdir = str(tmp_path / "no_teacher_here")
    with pytest.raises(
        FileNotFoundError, match=r"no exported model at .*no_teacher_here.*train that run first"
    ):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_batch_size_larger_than_the_dataset(tmp_path):
    config = _small(digits_student.get_config(), batch_size=100_000)
    with pytest.raises(
        ValueError, match=r"batch_size=100000 is larger than the digits train split \(1437"
    ):
        train_and_evaluate(config, str(tmp_path))


def test_bad_config_value(tmp_path):
    config = _small(digits_student.get_config())
    config.optimizer.learning_rate = -1.0
    with pytest.raises(ValueError, match=r"config.optimizer.learning_rate must be > 0, got -1.0"):
        train_and_evaluate(config, str(tmp_path))


def test_resuming_with_a_different_config_is_refused(tmp_path):
    train_and_evaluate(_small(digits_student.get_config(), steps=5), str(tmp_path))
    config = _small(digits_student.get_config(), steps=5)
    config.model.options = {"hidden": (8,)}
    with pytest.raises(ValueError, match=r"different config \(fields \['model'\] differ\)"):
        train_and_evaluate(config, str(tmp_path))
