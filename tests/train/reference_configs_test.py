"""The CIFAR / ImageNet reference configs run end to end on mock data.

Every config keeps its model, objective and quantization and runs 2 steps
with tiny batches (ImageNet at 32x32) on `tfds.testing.mock_data`. The
teachers and float models are `catalog_teacher` runs trained first, in the
same mock-data context as the runs that load them.
"""

import json
import math

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import (
    catalog_teacher,
    cifar10_resnet50_to_resnet18_features,
    cifar100_resnet32x4_to_resnet8x4,
    imagenet_mobilenet_v3_int8,
    imagenet_resnet34_to_resnet18,
)
from kdq.checkpoint import StateCheckpoints
from kdq.train import train_and_evaluate

pytestmark = pytest.mark.slow

STEPS = 2
# Compilation dominates these runs and grows with depth, so the ResNets run
# with one block per stage. Widths are kept: feature shapes (FitNets) and the
# layer types are those of the configs.
SHALLOW = {
    "resnet18": {"stage_sizes": (1, 1, 1, 1)},
    "resnet34": {"stage_sizes": (1, 1, 1, 1)},
    "resnet50": {"stage_sizes": (1, 1, 1, 1)},
    "resnet32x4": {"depth": 8},
}


def _small(config):
    config.model.options.update(SHALLOW.get(config.model.name, {}))
    if config.teacher.name:
        config.teacher.options.update(SHALLOW.get(config.teacher.name, {}))
    config.num_steps = STEPS
    config.batch_size = 4
    config.eval_batch_size = 4
    config.optimizer.warmup_steps = 1
    config.log_every = 1
    config.checkpoint_every = 1
    config.progress = False
    config.quant.calibration_batches = 2
    if config.dataset == "imagenet2012":
        config.image_size = 32
    return config


@pytest.fixture(scope="module")
def mock_catalog():
    # One context for the module: the mock examples are generated on the fly,
    # so teachers and the runs that load them share it.
    with tfds.testing.mock_data(num_examples=8):
        yield


@pytest.fixture(scope="module")
def float_run(tmp_path_factory, mock_catalog):
    """`float_run("dataset,model")`: the workdir and report of that catalog_teacher run, trained once."""
    runs = {}

    def run(arg):
        if arg not in runs:
            workdir = tmp_path_factory.mktemp(arg.replace(",", "_"))
            config = _small(catalog_teacher.get_config(arg))
            runs[arg] = str(workdir), train_and_evaluate(config, str(workdir))
        return runs[arg]

    return run


def _check_report(report, workdir, *, steps=STEPS):
    assert report["steps"] == steps
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert math.isfinite(report["test_loss"])
    with open(f"{workdir}/report.json") as f:
        assert json.load(f)["checkpoint_bytes"] == report["checkpoint_bytes"] > 0


def _train_metrics(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["train/loss"]) for r in train)
    return train


def _final_state(workdir):
    manager = StateCheckpoints(f"{workdir}/checkpoints", keep=2, every=1)
    try:
        return manager.restore(manager.latest_step())
    finally:
        manager.close()


@pytest.mark.parametrize(
    "arg",
    [
        "cifar10,resnet50",
        "cifar100,resnet32x4",
        "imagenet2012,resnet34",
        "imagenet2012,mobilenet_v3_large",
        "imagenet2012,mobilenet_v3_small",
        "imagenet2012,mobilenet_v2",
    ],
)
def test_catalog_teacher(arg, float_run):
    workdir, report = float_run(arg)
    _check_report(report, workdir)
    _train_metrics(workdir)
    assert report["weight_bits"] == report["act_bits"] == 32


def test_cifar10_resnet50_to_resnet18_features(float_run, tmp_path):
    teacher_dir, _ = float_run("cifar10,resnet50")
    config = _small(cifar10_resnet50_to_resnet18_features.get_config())
    config.teacher.workdir = teacher_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    for record in _train_metrics(tmp_path):
        assert record["train/loss/fitnets"] > 0 and math.isfinite(record["train/loss/fitnets"])
        assert math.isfinite(record["train/loss/kd"])
    # The 1x1 FitNets regressor maps resnet18 layer3 (256 channels) to resnet50 layer3 (1024).
    projection = _final_state(tmp_path)["distill_params"]["fitnets"]
    assert projection["kernel"].shape == (256, 1024)
    assert projection["bias"].shape == (1024,)
    assert np.all(np.isfinite(projection["kernel"]))


@pytest.mark.parametrize("arg", ["kd", "dkd"])
def test_cifar100_resnet32x4_to_resnet8x4(arg, float_run, tmp_path):
    teacher_dir, _ = float_run("cifar100,resnet32x4")
    config = _small(cifar100_resnet32x4_to_resnet8x4.get_config(arg))
    config.teacher.workdir = teacher_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    for record in _train_metrics(tmp_path):
        assert math.isfinite(record[f"train/loss/{arg}"])


def test_imagenet_resnet34_to_resnet18(float_run, tmp_path):
    teacher_dir, _ = float_run("imagenet2012,resnet34")
    config = _small(imagenet_resnet34_to_resnet18.get_config())
    config.teacher.workdir = teacher_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    for record in _train_metrics(tmp_path):
        assert math.isfinite(record["train/loss/kd"])


def _check_int8(report):
    assert report["weight_bits"] == report["act_bits"] == 8
    assert 0.0 <= report["test_accuracy_int"] <= 1.0
    assert report["latency_ms_float"] > 0 and report["latency_ms_int"] > 0
    assert report["latency_batch_size"] == 4
    # Int8 weights and their scales: a little over a quarter of float32.
    assert 0.25 < report["quantized_layers_bytes"] / report["quantized_layers_float_bytes"] < 0.3


@pytest.mark.parametrize("model", imagenet_mobilenet_v3_int8.MODELS)
def test_imagenet_mobilenet_int8_ptq(model, float_run, tmp_path):
    float_dir, float_report = float_run(f"imagenet2012,{model}")
    config = _small(imagenet_mobilenet_v3_int8.get_config(f"{model},ptq"))
    config.init_from = float_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path, steps=0)
    _check_int8(report)
    assert report["params"] == float_report["params"]


@pytest.mark.parametrize(
    "arg", [f"{model},qat" for model in imagenet_mobilenet_v3_int8.MODELS] + ["mobilenet_v2,qat,kd"]
)
def test_imagenet_mobilenet_int8_qat(arg, float_run, tmp_path):
    model = arg.split(",")[0]
    float_dir, _ = float_run(f"imagenet2012,{model}")
    config = _small(imagenet_mobilenet_v3_int8.get_config(arg))
    config.init_from = float_dir
    if config.teacher.workdir:
        config.teacher.workdir = float_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    _check_int8(report)
    train = _train_metrics(tmp_path)
    if arg.endswith(",kd"):
        assert all(math.isfinite(r["train/loss/kd"]) for r in train)
    # LSQ activation steps are trained: positive and finite.
    steps = jax.tree_util.tree_leaves(_final_state(tmp_path)["quant_params"]["activations"])
    assert steps and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in steps)
