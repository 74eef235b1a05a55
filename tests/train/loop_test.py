import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import (
    digits_kd,
    digits_prune_2of4_w4_kd,
    digits_prune_unstructured,
    digits_ptq_w8a8,
    digits_qat_kd,
    digits_qat_w2a2_kd,
    digits_qat_w4a4_kd,
    digits_student,
    digits_teacher,
)
from kdq.checkpoint import StateCheckpoints
from kdq.train import NonFiniteLossError, quantize_and_evaluate, train_and_evaluate
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


ALL_CONFIGS = [
    digits_teacher,
    digits_student,
    digits_kd,
    digits_qat_kd,
    digits_ptq_w8a8,
    digits_qat_w4a4_kd,
    digits_qat_w2a2_kd,
    digits_prune_2of4_w4_kd,
    digits_prune_unstructured,
]


def _with_teacher(config, teacher_workdir):
    if config.teacher.workdir:
        config.teacher.workdir = teacher_workdir
    if config.init_from:
        config.init_from = teacher_workdir
    return config


@pytest.mark.parametrize("module", ALL_CONFIGS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_config_trains_a_step_under_mock_data(module, tmp_path, teacher_workdir):
    config = _with_teacher(_small(module.get_config(), steps=2), teacher_workdir)
    config.prune.end = min(config.prune.end, 1)
    config.prune.frequency = 1
    run = quantize_and_evaluate if config.entry_point == "ptq" else train_and_evaluate
    with tfds.testing.mock_data(num_examples=64):
        report = run(config, str(tmp_path))
    assert report["steps"] == (0 if module is digits_ptq_w8a8 else 2)
    assert 0.0 <= report["test_accuracy"] <= 1.0
    with open(tmp_path / "report.json") as f:
        written = json.load(f)
    assert written["payload_bytes"] == report["payload_bytes"] > 0
    assert written["disk_bytes"] == report["disk_bytes"] > 0


def _params(workdir):
    path = os.path.join(workdir, "checkpoints")
    manager = StateCheckpoints(path, keep=2, every=1)
    try:
        step = manager.latest_step()
        return step, manager.restore(step)
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
        ValueError,
        match=r"batch_size=100000 is larger than the digits train split \(\d+ examples\)",
    ):
        train_and_evaluate(config, str(tmp_path))


def test_bad_config_value(tmp_path):
    config = _small(digits_student.get_config())
    config.optimizer.learning_rate = -1.0
    with pytest.raises(
        ValueError, match=r"config.optimizer.learning_rate must be a finite number > 0, got -1.0"
    ):
        train_and_evaluate(config, str(tmp_path))


def test_resuming_with_a_different_config_is_refused(tmp_path):
    train_and_evaluate(_small(digits_student.get_config(), steps=5), str(tmp_path))
    config = _small(digits_student.get_config(), steps=5)
    config.model.options = {"hidden": (8,)}
    with pytest.raises(ValueError, match=r"different config \(fields \['model'\] differ\)"):
        train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("arg", ["0.5", "0.9,kd"])
def test_unstructured_pruning_reaches_its_sparsity_and_keeps_zeros(arg, tmp_path, teacher_workdir):
    config = _with_teacher(
        _small(digits_prune_unstructured.get_config(arg), steps=30), teacher_workdir
    )
    config.prune.begin, config.prune.end, config.prune.frequency = 0, 20, 5
    report = train_and_evaluate(config, str(tmp_path))
    target = float(arg.split(",")[0])
    _, state = _params(tmp_path)
    kernels = [np.asarray(state["params"][name]["kernel"]) for name in ("Conv_1", "Dense_0")]
    assert np.all(np.asarray(state["params"]["Conv_0"]["kernel"]) != 0)
    pruned = sum(int(np.sum(k == 0)) for k in kernels)
    total = sum(k.size for k in kernels)
    # Per layer, exactly round(target * size) weights are zero (one element of slack each).
    assert abs(pruned - target * total) <= len(kernels)
    assert report["sparsity"] == pytest.approx(pruned / total)


def test_2of4_pattern_holds_after_training(tmp_path, teacher_workdir):
    config = _with_teacher(_small(digits_prune_2of4_w4_kd.get_config(), steps=20), teacher_workdir)
    train_and_evaluate(config, str(tmp_path))
    _, state = _params(tmp_path)
    for name in ("Conv_1", "Dense_0", "Dense_1"):
        kernel = np.asarray(state["params"][name]["kernel"])
        groups = np.moveaxis(kernel, -2, -1).reshape(-1, 4)
        np.testing.assert_array_equal(np.count_nonzero(groups, axis=-1), 2, err_msg=name)
