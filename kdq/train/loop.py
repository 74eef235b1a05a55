"""`train_and_evaluate(config, workdir, *, dataset=None)`: a whole run, resumable at any step.

A run is: build every part once (`kdq.train.build`, `create_train_state`),
trace the train step and the integer path (so a config that cannot run fails
before anything is written), train with periodic checkpoints, evaluate, and
export (`kdq.train.evaluation.finish_run`).

Files in `workdir`:
  config.json         the run's config (a resumed run must match it), written
                      once every part of the run has been built from it
  checkpoints/<step>  orbax train-state checkpoints (newest `keep_checkpoints`),
                      each checked finite before it is saved
  metrics.jsonl       one JSON object per logged step and per evaluation
  tensorboard/        the same scalars as TensorBoard event files (no TensorFlow)
  model/, model.json  the exported inference model and its recipe
  report.json         final metrics
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from kdq import checkpoint
from kdq.data import Dataset, train_batches
from kdq.sharding import DATA_AXIS, PARAM_RULES, shard_batch, tree_shardings
from kdq.train.config import validate
from kdq.train.evaluation import check_integer_path, finish_run, progress_bar
from kdq.train.lm import GeneratedBatches, check_sequence_models
from kdq.train.metrics import MetricWriter
from kdq.train.setup import Setup, build, create_train_state
from kdq.train.state import TrainState
from kdq.train.step import all_finite, make_train_step
from kdq.train.workdir import check_resumable, write_config


class NonFiniteLossError(FloatingPointError):
    """The loss, a gradient or the train state became NaN/inf; the run stopped before saving it."""


# Whether every floating-point entry of a tree is finite (one fused reduction).
_all_finite = jax.jit(all_finite)


def _last_good(checkpoints: checkpoint.StateCheckpoints) -> str:
    """Where the newest checkpoint is, for error messages (every saved one is finite)."""
    step = checkpoints.latest_step()
    if step is None:
        return f"no checkpoint was saved yet in {checkpoints.directory}"
    return f"kept its last good checkpoint (step {step}) in {checkpoints.directory}"


def _check_logged(logged: list[dict[str, Any]], step: int, checkpoints) -> None:
    """NonFiniteLossError naming the first step since the last log whose `finite` flag is 0."""
    if all(m["finite"] for m in logged):
        return
    bad = step - len(logged) + next(i for i, m in enumerate(logged) if not m["finite"])
    raise NonFiniteLossError(
        f"the loss, its gradient or the updated state became NaN/inf at step "
        f"{bad + 1}; the run stopped and {_last_good(checkpoints)}. Lower "
        "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm, "
        "and check the data for NaN/inf."
    )


def _check_savable(state: TrainState, checked_step: int, step: int, checkpoints) -> None:
    """NonFiniteLossError if the state about to be saved holds NaN/inf."""
    if _all_finite(state):
        return
    raise NonFiniteLossError(
        f"the train state became NaN/inf after step {checked_step} and by step "
        f"{step}, although every step reported a finite loss and gradient; it was "
        f"not saved, the run stopped and {_last_good(checkpoints)}. Lower "
        "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
    )


def _log(writer, progress, step: int, logged: list[dict[str, Any]], seconds: float, batch_size):
    """Writes the mean train metrics since the last log and updates the progress bar."""
    scalars = {
        name: float(np.mean([m[name] for m in logged])) for name in logged[-1] if name != "finite"
    }
    scalars["examples_per_second"] = len(logged) * batch_size / max(seconds, 1e-9)
    writer.write(step, {f"train/{k}": v for k, v in scalars.items()})
    progress.set_postfix(
        {k: f"{v:.4g}" for k, v in scalars.items() if "/" not in k and k != "examples_per_second"}
        | {"ex_s": f"{scalars['examples_per_second']:.0f}"}
    )
    progress.update(len(logged))


def _train(config, setup: Setup, state, train_step, checkpoints, writer, progress) -> TrainState:
    """Runs the steps after `state.step` up to config.num_steps; returns the final state.

    A state is saved only after the `finite` flags of the steps since the
    last log and the state itself (every floating-point leaf) are checked.
    """
    start_step = int(state.step)
    batches = train_batches(
        setup.dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        augment=setup.augment,
    )
    generated = None
    if config.generated.source != "none":
        generated = GeneratedBatches.from_config(config, setup)
    progress.update(start_step)
    checked_step, pending, window_start = start_step, [], time.perf_counter()
    for step in range(start_step + 1, config.num_steps + 1):
        batch = next(batches)
        if generated is not None:
            batch = generated(step, state, setup.teacher_variables, batch)
        state, metrics = train_step(state, setup.teacher_variables, shard_batch(batch, setup.mesh))
        pending.append(metrics)
        saves = step % config.checkpoint_every == 0 or step == config.num_steps
        if step % config.log_every and not saves:
            continue
        logged, pending = jax.device_get(pending), []
        _check_logged(logged, step, checkpoints)
        _log(writer, progress, step, logged, time.perf_counter() - window_start, config.batch_size)
        window_start = time.perf_counter()
        if saves:
            _check_savable(state, checked_step, step, checkpoints)
            checked_step = step
            checkpoints.save(step, state, force=step == config.num_steps)
    return state


def _restore(state: TrainState, checkpoints) -> TrainState:
    """The newest checkpoint restored into `state`'s shardings, or `state` when there is none."""
    restored = checkpoints.restore_latest(state)
    if restored is None:
        return state
    if not _all_finite(restored):
        raise ValueError(
            f"checkpoint {os.path.join(checkpoints.directory, str(checkpoints.latest_step()))}"
            " holds NaN/inf values, so the run cannot resume from it: move that step "
            "directory away to resume from the one before, or use a new workdir"
        )
    return restored


def _prepare(config, dataset) -> tuple[Setup, TrainState, Any]:
    """Builds the run, places it on the mesh and traces its step and integer path.

    Tracing (not compiling) raises the loss terms' and the step's own errors
    before anything is written. It traces the step on the arguments of the
    run itself (the placed state, the sharded batch), so jit keeps that
    trace and the run's steps are not traced again.
    """
    setup = build(config, dataset)
    check_sequence_models(config, setup)
    state = create_train_state(config, setup)
    check_integer_path(setup, state, config.batch_size)
    mesh = setup.mesh
    rules = [*config.sharding.param_rules, *PARAM_RULES[config.sharding.strategy]]
    state = jax.device_put(state, tree_shardings(state, mesh, rules))
    setup = dataclasses.replace(
        setup,
        teacher_variables=jax.device_put(
            setup.teacher_variables, tree_shardings(setup.teacher_variables, mesh)
        ),
    )
    train_step = make_train_step(
        setup.student,
        setup.objective,
        setup.tx,
        task=setup.task,
        teacher=setup.teacher,
        recipe=setup.recipe,
        max_traces=1,
    )
    data_parallel = NamedSharding(mesh, PartitionSpec(DATA_AXIS))  # as shard_batch places it
    batch = {
        name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=data_parallel)
        for name, spec in setup.example_batch(config.batch_size).items()
    }
    jax.eval_shape(train_step, state, setup.teacher_variables, batch)
    return setup, state, train_step


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, dataset: Dataset | None = None
) -> dict[str, Any]:
    """Trains the configured student (optionally distilled, quantized, pruned) and evaluates it.

    Every part of the run (config values, dataset, model, objective, recipe,
    pruning, teacher, optimizer, initial state, the traced train step and
    integer path) is built before workdir/config.json is written, so a
    config that fails leaves no trace that would refuse its corrected version.
    The train step is traced once per run (a second trace raises an AssertionError).

    Args:
      config: a config built on `kdq.train.default_config()`.
      workdir: the run directory; an existing run there is resumed (with the
        same config; `progress` may differ).
      dataset: the data to train on instead of `config.dataset` (e.g. from
        `kdq.data.from_arrays`).

    Returns:
      The final report (also written to workdir/report.json); see the README
      for its fields.
    """
    validate(config)
    workdir, current, new_run = check_resumable(config, workdir, "train", dataset)
    with progress_bar(config, workdir, total=config.num_steps) as progress:
        setup, state, train_step = _prepare(config, dataset)
        if new_run:
            write_config(workdir, current)
        progress.set_description(f"{os.path.basename(workdir)}: train")
        checkpoints = checkpoint.StateCheckpoints(
            os.path.join(workdir, "checkpoints"),
            keep=config.keep_checkpoints,
            every=config.checkpoint_every,
        )
        with MetricWriter(workdir) as writer:
            try:
                state = _restore(state, checkpoints)
                start = time.perf_counter()
                state = _train(config, setup, state, train_step, checkpoints, writer, progress)
                train_seconds = time.perf_counter() - start
            finally:
                checkpoints.close()
            return finish_run(
                config, workdir, setup, state, writer, progress, train_seconds=train_seconds
            )
