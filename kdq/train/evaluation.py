"""Evaluation of a trained (or quantized) student, and the export step every run ends with.

`evaluate` runs an eval function over one padded pass of a split and lets
the task turn the summed `eval_sums` into metrics. `export_and_evaluate`
writes the inference model (float variables, or the `QuantizedModel` with
integer weights) to `<workdir>/model`, measures its size, and — for a model
with quantized weights and activations — evaluates the integer path
(`kdq.quant.integer_apply`) on the test split (`test_<metric>_int`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import tqdm

from kdq import checkpoint
from kdq.data import eval_batches
from kdq.models import count_params
from kdq.quant import integer_apply, is_integer_model, to_quantized_model
from kdq.report import bits_summary, provenance
from kdq.train.lm import generation_speed, is_language_model
from kdq.train.metrics import MetricWriter
from kdq.train.setup import Setup
from kdq.train.state import TrainState
from kdq.train.step import make_eval_step

# Report prefix of each evaluated split.
SPLIT_NAMES = {"validation": "val", "test": "test"}


def evaluate(
    eval_fn: Callable[..., dict[str, Any]],
    *args: Any,
    setup: Setup,
    split: str,
    batch_size: int,
) -> dict[str, float]:
    """The task's metrics of `eval_fn(*args, batch)` over one pass of `split`.

    Args:
      eval_fn: returns the task's `eval_sums` of one batch.
      *args: its leading arguments (variables, quantizer state, ...).
      setup: gives the dataset and the task.
      split: "validation", "test" or "train".
      batch_size: examples per batch (the last one padded and masked).

    Returns:
      `setup.task.summarize` of the sums (classification: accuracy, loss).
    """
    totals: dict[str, Any] = {}
    for batch in eval_batches(setup.dataset, batch_size=batch_size, split=split):
        for name, value in jax.device_get(eval_fn(*args, batch)).items():
            totals[name] = totals.get(name, 0) + value
    return setup.task.summarize(totals)


def _model_info(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"model": config.model.name, "model_options": config.model.options.to_dict()}


def export_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, setup: Setup, state: TrainState
) -> dict[str, Any]:
    """Writes workdir/model (+ model.json) and returns the report fields of the exported model.

    Fields: `payload_bytes` (what the exported numbers cost: packed integers,
    scales, zero points and float leaves), `disk_bytes` (the orbax directory,
    metadata included), the bits summary of `kdq.report.bits_summary`, and
    for integer models `test_<metric>_int` of the integer path
    (classification: `test_accuracy_int`, `test_loss_int`).

    Args:
      config: the run's config.
      workdir: the run directory.
      setup: the run's parts.
      state: the final state.

    Returns:
      The report fields.
    """
    path = os.path.join(workdir, "model")
    recipe = setup.recipe
    fields = bits_summary(state.params, recipe)
    if not (recipe.quantizes_weights or recipe.quantizes_activations):
        checkpoint.export_model(workdir, state.variables, _model_info(config))
        payload = checkpoint.payload_bytes(state.variables)
        return {"payload_bytes": payload, "disk_bytes": checkpoint.directory_bytes(path), **fields}
    qmodel = to_quantized_model(
        state.params, recipe, state.quant_params, model_state=state.model_state
    )
    checkpoint.save_quantized(path, qmodel, metadata=_model_info(config))
    fields.update(
        payload_bytes=checkpoint.payload_bytes(qmodel),
        disk_bytes=checkpoint.directory_bytes(path),
    )
    if is_integer_model(recipe):
        task, student = setup.task, setup.student

        @jax.jit
        def integer_sums(qmodel, batch):
            logits = integer_apply(student, qmodel, task.inputs(batch))
            return task.eval_sums(logits, task.targets(batch))

        integer = evaluate(
            integer_sums, qmodel, setup=setup, split="test", batch_size=config.eval_batch_size
        )
        fields.update({f"test_{name}_int": value for name, value in integer.items()})
    return fields


def check_integer_path(setup: Setup, state: TrainState, batch_size: int) -> None:
    """Traces the integer path of an integer model, raising its per-layer errors now.

    The integer path checks each layer when it is traced (e.g. that its int32
    accumulator cannot overflow); a run calls this before it trains, so a
    model that could not be exported fails before any step.
    """
    if not is_integer_model(setup.recipe):
        return
    qmodel = to_quantized_model(
        state.params, setup.recipe, state.quant_params, model_state=state.model_state
    )
    jax.eval_shape(
        lambda q, x: integer_apply(setup.student, q, x), qmodel, setup.example_inputs(batch_size)
    )


@contextlib.contextmanager
def progress_bar(config: ml_collections.ConfigDict, workdir: str, total: int | None) -> Iterator:
    """A tqdm bar "<run>: <stage>" (prepare, train, evaluate, export, done), closed on exit."""
    bar = tqdm.tqdm(
        total=total,
        disable=not config.progress,
        desc=f"{os.path.basename(workdir)}: prepare",
        dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


def finish_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    setup: Setup,
    state: TrainState,
    writer: MetricWriter,
    progress,
    *,
    train_seconds: float,
) -> dict[str, Any]:
    """Evaluates the final state on validation and test, exports it, writes report.json.

    The split metrics go to `writer` ("val/accuracy", "test/loss", ...) at
    the final step; the report holds them as "val_accuracy", "test_loss", ...
    next to the export's fields (`export_and_evaluate`).

    Returns:
      The report.
    """
    run = os.path.basename(workdir)
    progress.set_description(f"{run}: evaluate")
    eval_step = make_eval_step(setup.student, task=setup.task, recipe=setup.recipe, max_traces=1)
    splits = [s for s in SPLIT_NAMES if getattr(setup.dataset, s) is not None]
    results = {
        SPLIT_NAMES[split]: evaluate(
            eval_step,
            state.variables,
            state.quant_params,
            setup=setup,
            split=split,
            batch_size=config.eval_batch_size,
        )
        for split in splits
    }
    scalars = {f"{name}_{k}": v for name, metrics in results.items() for k, v in metrics.items()}
    writer.write(
        int(state.step),
        {f"{name}/{k}": v for name, metrics in results.items() for k, v in metrics.items()},
    )
    report = {
        "task": config.task,
        "model": config.model.name,
        "dataset": setup.dataset.name,
        "params": count_params(state.params),
        "seed": config.seed,
        "steps": int(state.step),
        "train_seconds": train_seconds,
        **scalars,
    }
    if setup.pruning is not None:
        report["sparsity"] = setup.pruning.sparsity(state.params)
    progress.set_description(f"{run}: export")
    report.update(export_and_evaluate(config, workdir, setup, state))
    if is_language_model(setup):
        report.update(generation_speed(setup, state))
    report["provenance"] = provenance()
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    progress.set_description(f"{run}: done")
    headline = next(iter(results["test"]))
    progress.set_postfix({f"test_{headline}": f"{results['test'][headline]:.4f}"})
    return report
