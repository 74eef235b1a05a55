"""The run entry points: a user's arrays, post-training quantization, old workdirs, metrics."""

import dataclasses
import glob
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2

from experiments.configs import digits_ptq_w8a8, digits_teacher
from kdq.checkpoint import load_float_variables
from kdq.data import eval_batches, from_arrays, load_dataset
from kdq.distill import Objective
from kdq.models import create_model
from kdq.quant import integer_apply, ptq
from kdq.train import (
    TrainState,
    build,
    default_config,
    make_train_step,
    quantize_and_evaluate,
    train_and_evaluate,
)

pytestmark = pytest.mark.slow


def _tiny(config=None, steps=12):
    config = config or default_config()
    config.model.options = {"hidden": (16,)}
    config.num_steps = steps
    config.batch_size = 32
    config.log_every = 4
    config.checkpoint_every = 6
    config.optimizer.warmup_steps = 1
    config.progress = False
    return config


def _blobs(rng, n):
    """Images (n, 4, 4, 1) whose class is the sign of their mean: +-1 offset plus noise."""
    labels = rng.integers(0, 2, size=n)
    images = rng.normal(size=(n, 4, 4, 1)) + np.where(labels, 1.0, -1.0)[:, None, None, None]
    return images.astype(np.float32), labels.astype(np.int32)


def _accuracy(model, variables, dataset, split):
    correct = count = 0
    for batch in eval_batches(dataset, batch_size=64, split=split):
        logits = np.asarray(model.apply(variables, batch["image"]))
        mask = np.asarray(batch["mask"])
        correct += int(np.sum((logits.argmax(-1) == np.asarray(batch["label"])) & mask))
        count += int(mask.sum())
    return correct / count


def _scalars(workdir):
    """{tag: [(step, value)]} read from the TensorBoard event files (TFRecord framing)."""
    scalars = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents*")):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture(scope="module")
def arrays_run(tmp_path_factory):
    rng = np.random.default_rng(0)
    dataset = from_arrays(_blobs(rng, 256), _blobs(rng, 96), _blobs(rng, 64), name="blobs")
    workdir = str(tmp_path_factory.mktemp("arrays"))
    config = _tiny(steps=30)
    return dataset, workdir, train_and_evaluate(config, workdir, dataset=dataset)


def test_train_and_evaluate_trains_on_a_users_arrays(arrays_run):
    dataset, workdir, report = arrays_run
    assert report["dataset"] == "blobs" and report["steps"] == 30
    model = create_model("mlp", num_classes=2, hidden=(16,))
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))
    variables = load_float_variables(workdir, template)
    # The report's accuracies are those of the exported model, recomputed here.
    assert report["test_accuracy"] == _accuracy(model, variables, dataset, "test")
    assert report["val_accuracy"] == _accuracy(model, variables, dataset, "validation")
    assert report["test_accuracy"] > 0.9


def test_train_validation_and_test_metrics_reach_tensorboard(arrays_run):
    _, workdir, report = arrays_run
    scalars = _scalars(workdir)
    for split in ("val", "test"):
        for metric in ("accuracy", "loss"):
            ((step, value),) = scalars[f"{split}/{metric}"]
            assert step == 30
            assert value == pytest.approx(report[f"{split}_{metric}"], rel=1e-6)
    assert [step for step, _ in scalars["train/loss"]] == [4, 6, 8, 12, 16, 18, 20, 24, 28, 30]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert lines[-1] == {"step": 30, **{k: pytest.approx(v) for k, v in _split_metrics(report)}}


def _split_metrics(report):
    return [
        (f"{split}/{metric}", report[f"{split}_{metric}"])
        for split in ("val", "test")
        for metric in ("accuracy", "loss")
    ]


def test_a_dataset_argument_must_be_a_dataset(tmp_path):
    with pytest.raises(ValueError, match="dataset must be a kdq.data.Dataset"):
        train_and_evaluate(_tiny(), str(tmp_path), dataset={"train": []})
    assert not os.path.exists(tmp_path / "config.json")


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = digits_teacher.get_config()
    config.update(num_steps=20, batch_size=32, progress=False, checkpoint_every=20)
    config.optimizer.warmup_steps = 2
    train_and_evaluate(config, workdir)
    return workdir


def _ptq_config(teacher_workdir):
    config = digits_ptq_w8a8.get_config()
    config.update(init_from=teacher_workdir, progress=False, batch_size=32)
    return config


def test_post_training_quantization_is_its_own_entry_point(tmp_path, teacher_workdir):
    config = _ptq_config(teacher_workdir)
    report = quantize_and_evaluate(config, str(tmp_path))
    assert report["steps"] == 0 and report["train_seconds"] == 0.0
    assert not os.path.exists(tmp_path / "checkpoints")
    # The same quantization by hand: kdq.quant.ptq on the first 4 train batches.
    setup = build(config)
    model = setup.student
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    variables = load_float_variables(teacher_workdir, template)
    dataset = load_dataset("digits")
    batches = [
        b["image"][b["mask"]]
        for _, b in zip(range(4), eval_batches(dataset, batch_size=32, split="train"), strict=False)
    ]
    qmodel = ptq(model, variables, batches, setup.recipe, act_method="minmax")
    correct = count = 0
    for batch in eval_batches(dataset, batch_size=256, split="test"):
        logits = np.asarray(integer_apply(model, qmodel, batch["image"]))
        correct += int(np.sum((logits.argmax(-1) == batch["label"]) & batch["mask"]))
        count += int(batch["mask"].sum())
    assert report["test_accuracy_int"] == correct / count
    assert report["weight_bits"] == 8 and report["act_bits"] == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"init_from": ""}, "set config.init_from"),
        ({"quant.act_mode": "lsq"}, r"learned quantizers \(act_mode='lsq'\)"),
        ({"quant.weight_mode": "lsq"}, r"learned quantizers \(weight_mode='lsq'\)"),
        ({"entry_point": "train"}, r"written for kdq\.train\.train_and_evaluate"),
        ({"quant.weight_bits": 0, "quant.act_bits": 0}, "nothing to quantize"),
    ],
)
def test_ptq_refuses_what_needs_training(tmp_path, change, message):
    config = _ptq_config("runs/none")
    for path, value in change.items():
        section, _, name = path.rpartition(".")
        (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message):
        quantize_and_evaluate(config, str(tmp_path))


def test_config_mode_is_refused_naming_the_entry_points(tmp_path):
    config = _tiny()
    config.mode = "ptq"
    with pytest.raises(ValueError, match=r"experiments\.ptq.*quantize_and_evaluate"):
        train_and_evaluate(config, str(tmp_path))


def _old_layout(workdir, mode):
    """Rewrites workdir/config.json as the layout with `mode` and without the newer fields."""
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["mode"] = mode
    config.pop("task", None)
    config["optimizer"].pop("quant_learning_rate", None)
    with open(path, "w") as f:
        json.dump(config, f)


def test_a_workdir_of_the_mode_layout_resumes(arrays_run, tmp_path):
    dataset, workdir, report = arrays_run
    copy = str(shutil.copytree(workdir, tmp_path / "run"))
    _old_layout(copy, "train")
    resumed = train_and_evaluate(_tiny(steps=30), copy, dataset=dataset)
    assert resumed["test_accuracy"] == report["test_accuracy"]
    assert resumed["steps"] == 30
    _old_layout(copy, "ptq")
    with pytest.raises(ValueError, match=r"holds a run of kdq\.train\.quantize_and_evaluate"):
        train_and_evaluate(_tiny(steps=30), copy, dataset=dataset)


def test_each_entry_point_refuses_the_others_configs_and_workdirs(arrays_run, tmp_path):
    dataset, workdir, _ = arrays_run
    with pytest.raises(ValueError, match=r"entry_point='ptq'.*written for kdq\.train\.quantize"):
        train_and_evaluate(_ptq_config("runs/none"), str(tmp_path))
    config = _tiny(steps=30)
    config.update(entry_point="ptq", init_from=workdir)
    config.quant.weight_bits = 8
    with pytest.raises(ValueError, match=r"holds a run of kdq\.train\.train_and_evaluate"):
        quantize_and_evaluate(config, workdir, dataset=dataset)
    assert not os.listdir(tmp_path)


def test_a_run_is_not_resumed_on_other_arrays(arrays_run, tmp_path):
    dataset, workdir, _ = arrays_run
    copy = str(shutil.copytree(workdir, tmp_path / "run"))
    rng = np.random.default_rng(5)
    other = from_arrays(_blobs(rng, 200), _blobs(rng, 96), _blobs(rng, 64), name="blobs")
    with pytest.raises(ValueError, match=r"fields \['dataset'\] differ"):
        train_and_evaluate(_tiny(steps=30), copy, dataset=other)


class _PlainFeatures:
    """The digits' image features behind an interface that is not `ImageFeatures`."""

    def __init__(self, features):
        self._features = features

    def __getattr__(self, name):
        return getattr(self._features, name)


def test_augmenting_examples_that_are_not_images_is_refused_before_anything_is_written(
    arrays_run, tmp_path
):
    dataset = arrays_run[0]
    plain = dataclasses.replace(dataset, features=_PlainFeatures(dataset.features))
    config = _tiny()
    config.augment.horizontal_flip = True
    with pytest.raises(ValueError, match="config.augment asks for .* _PlainFeatures"):
        train_and_evaluate(config, str(tmp_path), dataset=plain)
    assert not os.listdir(tmp_path)


def test_the_run_step_fails_when_traced_twice():
    model = create_model("mlp", num_classes=3, hidden=(4,))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)))["params"]
    tx = optax.sgd(0.1)
    objective = Objective.from_config({"ce": {"weight": 1.0}})
    step = make_train_step(model, objective, tx, max_traces=1)

    def state():
        fresh = jax.tree_util.tree_map(jnp.copy, params)  # the step donates its state
        return TrainState.create(params=fresh, tx=tx, key=jax.random.PRNGKey(1))

    batch = {"image": jnp.ones((4, 2, 2, 1)), "label": jnp.zeros(4, jnp.int32)}
    step(state(), None, batch)
    step(state(), None, batch)
    with pytest.raises(AssertionError, match=r"train_step was traced 2 times \(at most 1"):
        step(state(), None, {"image": jnp.ones((8, 2, 2, 1)), "label": jnp.zeros(8, jnp.int32)})
