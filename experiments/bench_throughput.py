"""Throughput of the jitted KD (+QAT) train step of a config, on this machine's devices.

    python -m experiments.bench_throughput --config=experiments/configs/digits_qat_kd.py \
        --batch_size=256 --steps=50

Builds the config's student, teacher (randomly initialised: throughput does
not depend on trained weights), objective, quantization recipe and optimizer
exactly as `train_and_evaluate` does, feeds one synthetic batch of the
dataset's shape (no input pipeline in the measurement), and reports
examples/s as the median over repeated timed windows after warm-up, with the
compile time and the device. `--config.model.dtype=bfloat16` measures
bf16 compute.
"""

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from kdq.distill import Objective, apply_with_taps
from kdq.quant import init_quant_params
from kdq.sharding import make_mesh, shard_batch, tree_shardings
from kdq.train import (
    TrainState,
    build_model,
    make_optimizer,
    make_train_step,
    pruning,
    quant_recipe,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 50, "Steps per timed window.")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows (the median is reported).")
_OUT = flags.DEFINE_string("out", "", "Write the figures as JSON to this file.")
flags.mark_flags_as_required(["config"])

# (height, width, channels, classes) of the datasets kdq knows.
SHAPES = {
    "digits": (8, 8, 1, 10),
    "mnist": (28, 28, 1, 10),
    "fashion_mnist": (28, 28, 1, 10),
    "cifar10": (32, 32, 3, 10),
    "cifar100": (32, 32, 3, 100),
    "imagenet2012": (224, 224, 3, 1000),
}


def build(config, batch_size):
    """The jitted step, its state, the teacher's variables and one batch."""
    if config.dataset not in SHAPES:
        raise ValueError(f"unknown dataset {config.dataset!r}; known: {sorted(SHAPES)}")
    height, width, channels, classes = SHAPES[config.dataset]
    if config.image_size:
        height = width = config.image_size
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(size=(batch_size, height, width, channels)).astype(np.float32),
        "label": rng.integers(0, classes, size=batch_size).astype(np.int32),
    }
    student = build_model(config.model, classes)
    objective = Objective.from_config(config.losses.to_dict())
    recipe = quant_recipe(config)
    tx = make_optimizer(config, pruning(config))
    variables = dict(student.init(jax.random.PRNGKey(0), batch["image"]))
    params = variables.pop("params")
    quant_params = init_quant_params(
        student, {"params": params, **variables}, recipe, [batch["image"]]
    )
    teacher, teacher_variables, distill_params = None, None, {}
    if objective.needs_teacher:
        teacher = build_model(config.teacher, classes)
        teacher_variables = teacher.init(jax.random.PRNGKey(1), batch["image"])
        _, s_feat, _ = jax.eval_shape(
            lambda v: apply_with_taps(student, v, batch["image"], taps=objective.student_taps),
            {"params": params, **variables},
        )
        _, t_feat, _ = jax.eval_shape(
            lambda v: apply_with_taps(teacher, v, batch["image"], taps=objective.teacher_taps),
            teacher_variables,
        )
        distill_params = objective.init_params(jax.random.PRNGKey(2), s_feat, t_feat)
    state = TrainState.create(
        params=params,
        tx=tx,
        key=jax.random.PRNGKey(3),
        quant_params=quant_params,
        distill_params=distill_params,
        model_state=variables,
    )
    mesh = make_mesh(config.sharding.num_devices, config.sharding.model_parallel)
    state = jax.device_put(state, tree_shardings(state, mesh, list(config.sharding.param_rules)))
    teacher_variables = jax.device_put(teacher_variables, tree_shardings(teacher_variables, mesh))
    step = make_train_step(student, objective, tx, teacher=teacher, recipe=recipe)
    return step, state, teacher_variables, shard_batch(batch, mesh)


def main(argv):
    del argv
    config = _CONFIG.value
    step, state, teacher_variables, batch = build(config, _BATCH.value)
    start = time.perf_counter()
    state, metrics = step(state, teacher_variables, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    throughputs = []
    for _ in range(_WINDOWS.value):
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            state, metrics = step(state, teacher_variables, batch)
        jax.block_until_ready((state, metrics))
        throughputs.append(_STEPS.value * _BATCH.value / (time.perf_counter() - start))
    figures = {
        "config": config.model.name + (" <- " + config.teacher.name if config.teacher.name else ""),
        "dataset": config.dataset,
        "batch_size": _BATCH.value,
        "weight_bits": config.quant.weight_bits or 32,
        "act_bits": config.quant.act_bits or 32,
        "dtype": config.model.dtype or "float32",
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "host": platform.node(),
        "jax": jax.__version__,
        "compile_and_first_step_s": compile_seconds,
        "examples_per_second_median": statistics.median(throughputs),
        "examples_per_second_min": min(throughputs),
        "examples_per_second_max": max(throughputs),
        "loss_finite": bool(jnp.isfinite(metrics["loss"])),
    }
    print(
        f"{figures['config']} on {figures['dataset']}, batch {_BATCH.value}, "
        f"W{figures['weight_bits']}A{figures['act_bits']} {figures['dtype']}, "
        f"{len(jax.devices())} x {figures['device_kind']}: "
        f"{figures['examples_per_second_median']:,.0f} examples/s "
        f"(min {figures['examples_per_second_min']:,.0f}, max {figures['examples_per_second_max']:,.0f}); "
        f"compile + first step {compile_seconds:.1f} s"
    )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    flags.FLAGS.set_default("verbosity", logging.WARNING)
    app.run(main)
