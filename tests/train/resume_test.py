"""An interrupted and resumed run ends bit-identical to an uninterrupted one.

The config has every piece of state a resume must restore: random crops and
flips (the augmentation key and the data order across epochs), BatchNorm
statistics (resnet8), learned LSQ steps for 4-bit weights and activations,
2:4 pruning masks set mid-run (the pruning transform's count and masks in the
optimizer state) and KD from a teacher. It runs on mock CIFAR-10 with
batch 4 over 8 examples, so the 6 steps span three epochs.
"""

import json
import re

import flax
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdq.checkpoint import StateCheckpoints
from kdq.train import default_config, train_and_evaluate
from kdq.train import loop as loop_lib

pytestmark = pytest.mark.slow

STEPS = 6
# The run is stopped while fetching the batch of step 6: steps 1-5 ran, the
# checkpoint of step 4 is the newest, so the resumed run redoes step 5.
KILLED_AT_STEP = 6
MOCK_EXAMPLES = 8
PRUNED = "(layer.*|fc)/kernel"


def _config(teacher_workdir=""):
    config = default_config()
    config.dataset = "cifar10"
    config.num_steps = STEPS
    config.batch_size = 4
    config.eval_batch_size = 8
    config.log_every = 1
    config.checkpoint_every = 2
    config.progress = False
    config.optimizer.warmup_steps = 1
    config.quant.calibration_batches = 1
    if not teacher_workdir:
        config.model = {"name": "mlp", "options": {"hidden": (8,)}, "dtype": ""}
        return config
    config.model.name = "resnet8"
    config.augment.standard = True  # 4-pixel padded random crop + horizontal flip
    config.teacher.name = "mlp"
    config.teacher.options = {"hidden": (8,)}
    config.teacher.workdir = teacher_workdir
    config.losses = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}}
    config.quant.weight_bits = config.quant.act_bits = 4
    config.quant.weight_mode = config.quant.act_mode = "lsq"
    config.prune.structure = "n:m"
    config.prune.n, config.prune.m = 2, 4
    # The stem conv has 3 input channels (no groups of 4): it stays dense.
    config.prune.regex = PRUNED
    config.prune.begin = 3
    return config


def _latest_state(workdir):
    manager = StateCheckpoints(str(workdir / "checkpoints"), keep=2, every=1)
    try:
        step = manager.latest_step()
        return step, manager.restore(step)
    finally:
        manager.close()


def _train_records(workdir):
    """The last record of every step in metrics.jsonl, without the timing."""
    records = {}
    with open(workdir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "train/loss" in record:
                record.pop("train/examples_per_second")
                records[record["step"]] = record
    return records


def test_resumed_run_with_augmentation_batchnorm_lsq_pruning_and_kd_is_bit_identical(
    tmp_path, monkeypatch, shared_compilations
):
    real_train_batches = loop_lib.train_batches

    def stopped_at_step_6(*args, **kwargs):
        for i, batch in enumerate(real_train_batches(*args, **kwargs)):
            if i == KILLED_AT_STEP - 1:
                raise KeyboardInterrupt
            yield batch

    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        train_and_evaluate(_config(), str(tmp_path / "teacher"))
        config = _config(str(tmp_path / "teacher"))
        full = train_and_evaluate(config, str(tmp_path / "full"))
        monkeypatch.setattr(loop_lib, "train_batches", stopped_at_step_6)
        with pytest.raises(KeyboardInterrupt):
            train_and_evaluate(config, str(tmp_path / "resumed"))
        monkeypatch.setattr(loop_lib, "train_batches", real_train_batches)
        assert _latest_state(tmp_path / "resumed")[0] == 4
        resumed = train_and_evaluate(config, str(tmp_path / "resumed"))

    step_full, state_full = _latest_state(tmp_path / "full")
    step_resumed, state_resumed = _latest_state(tmp_path / "resumed")
    assert step_full == step_resumed == STEPS
    # Every leaf: params, BatchNorm statistics, LSQ steps, optimizer and pruning state.
    assert jax.tree.structure(state_full) == jax.tree.structure(state_resumed)
    jax.tree.map(np.testing.assert_array_equal, state_full, state_resumed)
    # The run really holds that state: moving BatchNorm statistics, learned quantizer
    # steps for weights and activations, 2:4 masks.
    assert np.any(np.asarray(state_full["model_state"]["batch_stats"]["bn1"]["mean"]) != 0)
    for kind in ("weights", "activations"):
        assert jax.tree.leaves(state_full["quant_params"][kind]), kind
    params = flax.traverse_util.flatten_dict(state_full["params"], sep="/")
    pruned = [path for path in params if re.fullmatch(PRUNED, path)]
    assert len(pruned) == 9, sorted(params)  # 2 + 3 + 3 block convs, fc
    for path in pruned:
        groups = np.moveaxis(np.asarray(params[path]), -2, -1).reshape(-1, 4)
        np.testing.assert_array_equal(np.count_nonzero(groups, axis=-1), 2, err_msg=path)

    full_records = _train_records(tmp_path / "full")
    assert sorted(full_records) == list(range(1, STEPS + 1))
    assert _train_records(tmp_path / "resumed") == full_records
    for name in ("test_accuracy", "test_loss", "test_accuracy_int"):
        assert resumed[name] == full[name], name
