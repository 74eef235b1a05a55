"""The CIFAR / ImageNet reference configs run end to end on mock data.

Every run keeps its config's recipe, objective and quantization, and runs 2
steps with batch 4 (ImageNet at 32x32) on `tfds.testing.mock_data`. Teachers
and float models are `catalog_teacher` runs, trained first in the same
mock-data context as the runs that load them.

Compilation dominates these runs and grows with depth, so the networks are
shallower than the configs' (widths, block types and feature shapes are
kept): the ResNets have one block per stage (`stage_sizes`, `depth`
options), and "mobilenet_v3_large" is a four-block MobileNetV3-Large (no
model option sets the depth of a MobileNet). The int8 MobileNet runs use
mobilenet_v3_large; the other two models' arguments are checked as configs.
"""

import json
import math

import flax
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
from kdq.models import MODELS, MobileNetV3Large
from kdq.train import config as config_lib
from kdq.train import train_and_evaluate

pytestmark = pytest.mark.slow

STEPS = 2
SHALLOW = {
    "resnet18": {"stage_sizes": (1, 1, 1, 1)},
    "resnet34": {"stage_sizes": (1, 1, 1, 1)},
    "resnet50": {"stage_sizes": (1, 1, 1, 1)},
    "resnet32x4": {"depth": 8},
}


class ShallowMobileNetV3Large(MobileNetV3Large):
    """Blocks 0, 3, 4 and 6 of MobileNetV3-Large: a residual block without
    expansion, a 5x5 squeeze-excitation block (stride 2), an expanded residual
    squeeze-excitation block and a hard-swish block (stride 2)."""

    setting = tuple(MobileNetV3Large.setting[i] for i in (0, 3, 4, 6))


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
def float_run(tmp_path_factory):
    """`float_run("<dataset>,<model>")`: (workdir, report) of that catalog_teacher run, trained once.

    The tests that use it run inside its mock-data context: mock examples are
    generated on the fly, so a teacher and its students must share one.
    """
    runs = {}

    def run(arg):
        if arg not in runs:
            workdir = str(tmp_path_factory.mktemp(arg.replace(",", "_")))
            runs[arg] = (
                workdir,
                train_and_evaluate(_small(catalog_teacher.get_config(arg)), workdir),
            )
        return runs[arg]

    with tfds.testing.mock_data(num_examples=8), pytest.MonkeyPatch.context() as patch:
        patch.setitem(MODELS, "mobilenet_v3_large", ShallowMobileNetV3Large)
        yield run


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
    ],
)
def test_catalog_teacher(arg, float_run):
    workdir, report = float_run(arg)
    _check_report(report, workdir)
    _train_metrics(workdir)
    assert report["weight_bits"] == report["act_bits"] == 32


def test_catalog_teacher_covers_every_listed_pair():
    pairs = [(d, m) for d in ("cifar10", "cifar100") for m in catalog_teacher.CIFAR_MODELS]
    pairs += [
        (d, m) for d in ("cifar10", "cifar100", "imagenet2012") for m in catalog_teacher.RESNETS
    ]
    pairs += [("imagenet2012", m) for m in catalog_teacher.MOBILENETS]
    for dataset, model in pairs:
        config = catalog_teacher.get_config(f"{dataset},{model}")
        config_lib.validate(config)
        assert (config.dataset, config.model.name) == (dataset, model)
    with pytest.raises(ValueError, match="no cifar10 recipe for model 'mobilenet_v2'"):
        catalog_teacher.get_config("cifar10,mobilenet_v2")


def test_cifar10_resnet50_to_resnet18_features(float_run, tmp_path):
    teacher_dir, _ = float_run("cifar10,resnet50")
    config = _small(cifar10_resnet50_to_resnet18_features.get_config())
    config.teacher.workdir = teacher_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    for record in _train_metrics(tmp_path):
        assert record["train/loss/fitnets"] > 0 and math.isfinite(record["train/loss/fitnets"])
        assert math.isfinite(record["train/loss/kd"])
    # The FitNets regressor maps resnet18's layer3 (256 channels) to resnet50's (1024).
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
    assert all(math.isfinite(r[f"train/loss/{arg}"]) for r in _train_metrics(tmp_path))


def test_imagenet_resnet34_to_resnet18(float_run, tmp_path):
    teacher_dir, _ = float_run("imagenet2012,resnet34")
    config = _small(imagenet_resnet34_to_resnet18.get_config())
    config.teacher.workdir = teacher_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    assert all(math.isfinite(r["train/loss/kd"]) for r in _train_metrics(tmp_path))


def _check_int8(report):
    assert report["weight_bits"] == report["act_bits"] == 8
    assert 0.0 <= report["test_accuracy_int"] <= 1.0
    assert report["latency_ms_float"] > 0 and report["latency_ms_int"] > 0
    assert report["latency_batch_size"] == 4
    assert 0 < report["quantized_layers_bytes"] < report["quantized_layers_float_bytes"] / 2


def test_imagenet_mobilenet_v3_int8_ptq(float_run, tmp_path):
    float_dir, float_report = float_run("imagenet2012,mobilenet_v3_large")
    config = _small(imagenet_mobilenet_v3_int8.get_config("mobilenet_v3_large,ptq"))
    config.init_from = float_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path, steps=0)
    _check_int8(report)
    assert report["params"] == float_report["params"]


@pytest.mark.parametrize(
    "arg",
    [
        "mobilenet_v3_large,qat",
        "mobilenet_v3_large,qat,kd",
    ],
)
def test_imagenet_mobilenet_v3_int8_qat(arg, float_run, tmp_path):
    float_dir, _ = float_run("imagenet2012,mobilenet_v3_large")
    config = _small(imagenet_mobilenet_v3_int8.get_config(arg))
    config.init_from = float_dir
    if config.teacher.workdir:
        config.teacher.workdir = float_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    _check_int8(report)
    train = _train_metrics(tmp_path)
    if config.teacher.workdir:
        assert all(math.isfinite(r["train/loss/kd"]) for r in train)
    # One learned LSQ step per quantized layer input.
    steps = flax.traverse_util.flatten_dict(
        _final_state(tmp_path)["quant_params"]["activations"], sep="/"
    )
    assert "stem/conv/step" in steps and "fc/step" in steps
    assert all(np.isfinite(step) for step in steps.values())


@pytest.mark.parametrize("model", imagenet_mobilenet_v3_int8.MODELS)
def test_imagenet_mobilenet_v3_int8_arguments(model):
    for mode in ("ptq", "qat", "qat,kd"):
        config = imagenet_mobilenet_v3_int8.get_config(f"{model},{mode}")
        config_lib.validate(config)
        assert config.model.name == model
        assert config.init_from == f"runs/imagenet2012_{model}"
        assert config.teacher.workdir == ("" if mode != "qat,kd" else config.init_from)
    for bad in (model, f"{model},ptq,kd", f"{model},int8"):
        with pytest.raises(ValueError, match="config argument|PTQ does not train"):
            imagenet_mobilenet_v3_int8.get_config(bad)
