"""The CIFAR / ImageNet reference configs run end to end on mock data.

Every run keeps its config's recipe, objective and quantization, with batch 4
(ImageNet at 32x32) on `tfds.testing.mock_data` with 4 examples, so that
every step trains on the same 4 images (augmented as the config says).
Learning is asserted where 8 steps at batch 4 can show it: the RepDistiller
CIFAR recipes (lr 0.05) and the MobileNet one (lr 0.036) run 8 steps, and
their training loss must fall well below its first value, which a run that
does not learn fails. The torchvision ResNet recipes' lr 0.1 (meant for
batch 128-256) makes BatchNorm ResNets over 4 examples diverge within a few
steps, so those run 2 steps and check their losses are finite. The
quantization-aware run fine-tunes the trained float model at a small
learning rate; it is checked to start from that model: its KD loss at T = 1
against that same float model as teacher is near 0 from the first step.
Teachers and float models are `catalog_teacher` runs, trained first in the same
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
from kdq.train import quantize_and_evaluate, train_and_evaluate

pytestmark = pytest.mark.slow

STEPS = 2
LEARNING_STEPS = 8
MOCK_EXAMPLES = 4  # = the batch size: one fixed batch
# Measured on the learning runs: the last training loss is 0.16-0.66 times the first.
LEARNED_RATIO = 0.8
LEARNING_TEACHERS = ("cifar100,resnet32x4", "imagenet2012,mobilenet_v3_large")
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


def _small(config, steps=STEPS):
    config.model.options.update(SHALLOW.get(config.model.name, {}))
    if config.teacher.name:
        config.teacher.options.update(SHALLOW.get(config.teacher.name, {}))
    config.num_steps = steps
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
            steps = LEARNING_STEPS if arg in LEARNING_TEACHERS else STEPS
            runs[arg] = (
                workdir,
                train_and_evaluate(_small(catalog_teacher.get_config(arg), steps), workdir),
            )
        return runs[arg]

    with (
        tfds.testing.mock_data(num_examples=MOCK_EXAMPLES),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setitem(MODELS, "mobilenet_v3_large", ShallowMobileNetV3Large)
        yield run


def _check_report(report, workdir, *, steps=STEPS):
    assert report["steps"] == steps
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert math.isfinite(report["test_loss"])
    with open(f"{workdir}/report.json") as f:
        written = json.load(f)
    assert written["payload_bytes"] == report["payload_bytes"] > 0
    assert written["disk_bytes"] == report["disk_bytes"] > 0


def _train_metrics(workdir, steps=STEPS):
    with open(f"{workdir}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(r["train/loss"]) for r in train)
    return train


def _check_learns(workdir):
    """The loss on the fixed batch falls well below its first value."""
    losses = [r["train/loss"] for r in _train_metrics(workdir, LEARNING_STEPS)]
    assert losses[-1] < LEARNED_RATIO * losses[0], losses


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
    if arg in LEARNING_TEACHERS:
        _check_report(report, workdir, steps=LEARNING_STEPS)
        _check_learns(workdir)
    else:
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
    config = _small(cifar100_resnet32x4_to_resnet8x4.get_config(arg), LEARNING_STEPS)
    config.teacher.workdir = teacher_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path, steps=LEARNING_STEPS)
    _check_learns(tmp_path)
    train = _train_metrics(tmp_path, LEARNING_STEPS)
    assert all(math.isfinite(r[f"train/loss/{arg}"]) for r in train)


def test_imagenet_resnet34_to_resnet18(float_run, tmp_path):
    teacher_dir, _ = float_run("imagenet2012,resnet34")
    config = _small(imagenet_resnet34_to_resnet18.get_config())
    config.teacher.workdir = teacher_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    assert all(math.isfinite(r["train/loss/kd"]) for r in _train_metrics(tmp_path))


def _check_int8(report, float_report):
    assert report["weight_bits"] == report["act_bits"] == 8
    assert 0.0 <= report["test_accuracy_int"] <= 1.0
    # int8 kernels instead of float32 ones; BatchNorm and biases stay float.
    assert 0 < report["payload_bytes"] < float_report["payload_bytes"] / 2


def test_imagenet_mobilenet_v3_int8_ptq(float_run, tmp_path):
    float_dir, float_report = float_run("imagenet2012,mobilenet_v3_large")
    config = _small(imagenet_mobilenet_v3_int8.get_config("mobilenet_v3_large,ptq"))
    config.init_from = float_dir
    report = quantize_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path, steps=0)
    _check_int8(report, float_report)
    assert report["params"] == float_report["params"]


def test_imagenet_mobilenet_v3_int8_qat_kd(float_run, tmp_path):
    """The "qat,kd" config; "qat" alone differs only by its objective (no teacher)."""
    float_dir, float_report = float_run("imagenet2012,mobilenet_v3_large")
    config = _small(imagenet_mobilenet_v3_int8.get_config("mobilenet_v3_large,qat,kd"))
    assert config.losses.kd.temperature == 1.0
    config.init_from = config.teacher.workdir = float_dir
    report = train_and_evaluate(config, str(tmp_path))
    _check_report(report, tmp_path)
    _check_int8(report, float_report)
    train = _train_metrics(tmp_path)
    assert all(math.isfinite(r["train/loss/kd"]) for r in train)
    # It starts from the trained float model, its teacher (measured: 0.009).
    assert train[0]["train/loss/kd"] < 0.1, train[0]
    # One learned LSQ step per quantized layer input.
    steps = flax.traverse_util.flatten_dict(
        _final_state(tmp_path)["quant_params"]["activations"], sep="/"
    )
    layers = {path.rsplit("/", 1)[0] for path in steps}
    assert {"stem/conv", "fc"} <= layers and len(layers) == len(steps), sorted(steps)
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
