"""Data parallelism on 8 simulated CPU devices, in a process of its own."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdq.sharding import make_mesh, shard_batch, tree_shardings

pytestmark = pytest.mark.slow

# Reductions over the batch are summed in another order across 8 devices, so
# results agree to float32 rounding, not bitwise: 1e-5 relative on the loss and
# on the params after 4 KD + LSQ-QAT steps (learning rate 1e-3), and on the test
# loss of 4 steps of train_and_evaluate (digits, 4-bit QAT + KD).
TOLERANCE = 1e-5


def test_eight_devices_match_one_device(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "eight_devices.py")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [os.path.abspath(root), os.environ.get("PYTHONPATH")])
        ),
    }
    result = subprocess.run(
        [sys.executable, script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["loss_rel_diff"] < TOLERANCE, figures
    assert figures["param_rel_diff"] < TOLERANCE, figures
    assert figures["loop_test_loss_rel_diff"] < TOLERANCE, figures


def test_rules_shard_matching_leaves_and_replicate_the_rest():
    mesh = make_mesh(1)
    tree = {"params": {"Dense_0": {"kernel": np.zeros((4, 6)), "bias": np.zeros(6)}}}
    shardings = tree_shardings(tree, mesh, [("params/.*/kernel", (None, "model"))])
    assert tuple(shardings["params"]["Dense_0"]["kernel"].spec) == (None, "model")
    assert tuple(shardings["params"]["Dense_0"]["bias"].spec) == ()


def test_bad_sharding_inputs():
    mesh = make_mesh(1)
    with pytest.raises(ValueError, match=r"too many axes"):
        tree_shardings({"b": np.zeros(3)}, mesh, [("b", (None, "model"))])
    with pytest.raises(ValueError, match=r"num_devices=99 is not in 1\.\."):
        make_mesh(99)
    with pytest.raises(ValueError, match=r"model_parallel=0"):
        make_mesh(1, model_parallel=0)
    batch = shard_batch({"x": np.zeros((4, 2))}, mesh)
    assert batch["x"].shape == (4, 2) and isinstance(batch["x"], jax.Array)
