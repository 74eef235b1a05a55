"""Runs under 8 simulated CPU devices (see sharding_test.py): 1 device vs 8.

Prints a JSON line with the largest differences between the two runs.
"""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from kdq.distill import Objective  # noqa: E402
from kdq.models import create_model  # noqa: E402
from kdq.quant import QuantRecipe, QuantSpec, init_quant_params  # noqa: E402
from kdq.sharding import make_mesh, shard_batch, tree_shardings  # noqa: E402
from kdq.train import TrainState, make_train_step  # noqa: E402


def run(num_devices: int, steps: int = 4):
    mesh = make_mesh(num_devices)
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.uniform(size=(32, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, size=32).astype(np.int32),
        }
        for _ in range(steps)
    ]
    student = create_model("cnn", num_classes=10, channels=(8, 16), dense=32)
    teacher = create_model("cnn", num_classes=10, channels=(16, 32), dense=64)
    teacher_vars = teacher.init(jax.random.PRNGKey(1), batches[0]["image"])
    params = student.init(jax.random.PRNGKey(0), batches[0]["image"])["params"]
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=4, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=4, signed=False))],
        weight_mode="lsq",
        act_mode="lsq",
    )
    # The paper's initial steps, not calibration: absmax calibration puts each
    # channel's largest weight exactly on the clipping boundary, where the LSQ
    # gradient mask depends on the last bit of exp(log s), which XLA may round
    # differently in the 1- and 8-device programs.
    quant_params = init_quant_params(
        student, {"params": params}, recipe, [batches[0]["image"]], lsq_init="paper"
    )
    objective = Objective.from_config({"ce": {"weight": 0.5}, "kd": {"weight": 0.5}})
    tx = optax.adamw(1e-3)
    state = TrainState.create(
        params=params, tx=tx, key=jax.random.PRNGKey(2), quant_params=quant_params
    )
    state = jax.device_put(state, tree_shardings(state, mesh))
    teacher_vars = jax.device_put(teacher_vars, tree_shardings(teacher_vars, mesh))
    step = make_train_step(student, objective, tx, teacher=teacher, recipe=recipe)
    losses = []
    for batch in batches:
        state, metrics = step(state, teacher_vars, shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert len(state.params["Dense_0"]["kernel"].sharding.device_set) == num_devices
    return losses, jax.tree_util.tree_map(np.asarray, state.trainable)


def run_loop(num_devices: int, workdir: str) -> float:
    """train_and_evaluate for a few steps of the 4-bit QAT + KD config on digits."""
    from experiments.configs import digits_qat_kd, digits_teacher
    from kdq.train import train_and_evaluate

    teacher = digits_teacher.get_config()
    teacher.num_steps, teacher.optimizer.warmup_steps, teacher.progress = 4, 1, False
    teacher.sharding.num_devices = num_devices
    train_and_evaluate(teacher, os.path.join(workdir, "teacher"))
    config = digits_qat_kd.get_config()
    config.num_steps, config.optimizer.warmup_steps, config.progress = 4, 1, False
    config.teacher.workdir = os.path.join(workdir, "teacher")
    config.sharding.num_devices = num_devices
    return train_and_evaluate(config, os.path.join(workdir, "student"))["test_loss"]


def main():
    assert jax.device_count() == 8, jax.devices()
    workdir = sys.argv[1]
    loop_1 = run_loop(1, os.path.join(workdir, "one"))
    loop_8 = run_loop(8, os.path.join(workdir, "eight"))
    losses_1, state_1 = run(1)
    losses_8, state_8 = run(8)
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(losses_1, losses_8, strict=True))
    param_diff = max(
        float(np.max(np.abs(a - b) / (np.abs(a) + 1e-3)))
        for a, b in zip(
            jax.tree_util.tree_leaves(state_1), jax.tree_util.tree_leaves(state_8), strict=True
        )
    )
    figures = {
        "loss_rel_diff": loss_diff,
        "param_rel_diff": param_diff,
        "loop_test_loss_rel_diff": abs(loop_1 - loop_8) / abs(loop_1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
