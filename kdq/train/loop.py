"""`train_and_evaluate(config, workdir)`: a whole run, resumable at any step.

Files in `workdir`:
  config.json         the run's config (a resumed run must match it), written
                      once every part of the run has been built from it
  checkpoints/<step>  orbax train-state checkpoints (newest `keep_checkpoints`),
                      each checked finite before it is saved
  metrics.jsonl       one JSON object per logged step and per evaluation
  tensorboard/        TensorBoard event files (written without TensorFlow)
  model/, model.json  the exported inference model and its recipe
  report.json         final metrics
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
import tqdm

from kdq import checkpoint
from kdq.data import (
    Augment,
    Dataset,
    default_augment,
    eval_batches,
    load_dataset,
    train_batches,
)
from kdq.distill.objective import Objective
from kdq.distill.taps import apply_with_taps
from kdq.models import count_params
from kdq.prune import masked_pruning, sparsity_of
from kdq.quant.integer import integer_apply, to_quantized_model
from kdq.quant.qat import init_quant_params
from kdq.report import bits_summary, provenance
from kdq.sharding import DATA_AXIS, make_mesh, shard_batch, tree_shardings
from kdq.train import config as config_lib
from kdq.train.state import TrainState
from kdq.train.step import all_finite, classification_sums, make_eval_step, make_train_step


class NonFiniteLossError(FloatingPointError):
    """The loss, a gradient or the train state became NaN/inf; the run stopped before saving it."""


# Whether every floating-point entry of a tree is finite (one fused reduction).
_all_finite = jax.jit(all_finite)


def _decay_mask(trainable: dict[str, Any]) -> dict[str, Any]:
    """Weight decay on the params and loss params, never on quantizer state."""
    return {
        name: jax.tree_util.tree_map(lambda _, decay=name != "quant": decay, tree)
        for name, tree in trainable.items()
    }


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax optimizer of a run: schedule, optimizer, clipping, pruning.

    Args:
      config: a run config (its `optimizer`, `num_steps` and `prune` sections).

    Returns:
      The optax transformation over `TrainState.trainable`; weight decay
      spares the quantizer state, and pruning (if any) comes last.
    """
    opt = config.optimizer
    if opt.schedule == "cosine":
        learning_rate = optax.warmup_cosine_decay_schedule(
            0.0, opt.learning_rate, opt.warmup_steps, config.num_steps
        )
    elif opt.schedule == "constant":
        learning_rate = optax.join_schedules(
            [
                optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps),
                optax.constant_schedule(opt.learning_rate),
            ],
            [opt.warmup_steps],
        )
    else:
        raise ValueError(
            f"config.optimizer.schedule must be 'cosine' or 'constant', got {opt.schedule!r}"
        )
    if opt.name == "adamw":
        tx = optax.adamw(learning_rate, weight_decay=opt.weight_decay, mask=_decay_mask)
    elif opt.name == "adam":
        tx = optax.adam(learning_rate)
    elif opt.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
            optax.sgd(learning_rate, momentum=opt.momentum, nesterov=True),
        )
    else:
        raise ValueError(
            f"config.optimizer.name must be 'adamw', 'adam' or 'sgd', got {opt.name!r}"
        )
    if opt.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    pruning = config_lib.prune_setup(config)
    if pruning is not None:
        schedule, rules, scope = pruning
        tx = optax.chain(tx, masked_pruning(schedule, rules, scope=scope))
    return tx


def _previous_config(workdir: str) -> dict[str, Any] | None:
    """The config.json of the run in `workdir`, or None when there is none yet."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            previous = json.load(f)
        problem = None if isinstance(previous, dict) else f"a JSON {type(previous).__name__}"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise ValueError(
            f"{path} is unreadable ({problem}), so the run in {workdir} cannot be resumed: "
            "it was damaged or not written by kdq. Use a new --workdir, or delete "
            f"{workdir} to start over"
        )
    return previous


def _check_same_config(workdir: str, previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuses to resume a run with a config other than its own (`progress` aside).

    `num_steps` counts: the cosine schedule spans it, so a longer resumed run
    would follow another learning-rate curve than the steps it already took.
    """
    changed = sorted(
        k
        for k in set(previous) | set(current)
        if k != "progress" and previous.get(k) != current.get(k)
    )
    if not changed:
        return
    hint = ""
    if "num_steps" in changed:
        hint = (
            f" config.num_steps is {current.get('num_steps')!r} here but "
            f"{previous.get('num_steps')!r} in that run, and the learning-rate schedule spans "
            "num_steps, so a run cannot be extended in place: train longer in a new "
            "workdir (a float run's exported model can initialise it: "
            f"--config.init_from={workdir})."
        )
    raise ValueError(
        f"{workdir} holds a run with a different config (fields {changed} differ); "
        f"use a new --workdir, or delete the old one to start over.{hint}"
    )


def load_teacher(config: ml_collections.ConfigDict, dataset: Dataset):
    """The teacher model and its variables, restored from its run's export."""
    teacher_config = config.teacher
    if not teacher_config.name or not teacher_config.workdir:
        raise ValueError(
            "the objective distills from a teacher, but config.teacher.name and "
            f"config.teacher.workdir are not both set (got name={teacher_config.name!r}, "
            f"workdir={teacher_config.workdir!r})"
        )
    teacher = config_lib.build_model(teacher_config, dataset.num_classes)
    dummy = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    template = jax.eval_shape(teacher.init, jax.random.PRNGKey(0), dummy)
    return teacher, checkpoint.load_float_variables(teacher_config.workdir, template)


def _calibration_images(dataset: Dataset, config: ml_collections.ConfigDict) -> list[np.ndarray]:
    """The first `calibration_batches` train batches, in storage order."""
    images = []
    for batch in eval_batches(
        dataset.train, batch_size=config.batch_size, **pixel_options(dataset, config)
    ):
        images.append(batch["image"][batch["mask"]])
        if len(images) == config.quant.calibration_batches:
            break
    return images


def _init_state(config, student, teacher, teacher_variables, objective, recipe, tx, dataset):
    key = jax.random.PRNGKey(config.seed)
    init_key, distill_key, run_key = jax.random.split(key, 3)
    dummy = jnp.zeros((config.batch_size, *dataset.image_shape), jnp.float32)
    variables = dict(jax.jit(student.init)(init_key, dummy))
    if config.init_from:
        variables = checkpoint.load_float_variables(config.init_from, variables)
    params = variables.pop("params")
    quant_params = None
    if recipe.quantizes_weights or recipe.quantizes_activations:
        quant_params = init_quant_params(
            student,
            {"params": params, **variables},
            recipe,
            _calibration_images(dataset, config),
            act_method=config.quant.act_calibration,
            lsq_init=config.quant.lsq_init,
        )
    distill_params = {}
    if objective.needs_teacher:
        _, student_features, _ = jax.eval_shape(
            lambda p, x: apply_with_taps(
                student, {"params": p, **variables}, x, taps=objective.student_taps
            ),
            params,
            dummy,
        )
        _, teacher_features, _ = jax.eval_shape(
            lambda v, x: apply_with_taps(teacher, v, x, taps=objective.teacher_taps),
            teacher_variables,
            dummy,
        )
        distill_params = objective.init_params(distill_key, student_features, teacher_features)
    return TrainState.create(
        params=params,
        tx=tx,
        key=run_key,
        quant_params=quant_params,
        distill_params=distill_params,
        model_state=variables,
    )


def pixel_options(dataset: Dataset, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """How images are scaled (and normalised, when config.normalize) by the pipelines."""
    options = {"pixel_scale": dataset.pixel_scale}
    if config.normalize:
        options.update(mean=dataset.mean, std=dataset.std)
    return options


def evaluate(eval_fn, *args: Any, source, batch_size: int, **pixels: Any) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `eval_fn(*args, batch)` over one pass of `source`.

    `pixels` are the image options of `pixel_options`.
    """
    totals = {"correct": 0, "count": 0, "loss_sum": 0.0}
    for batch in eval_batches(source, batch_size=batch_size, **pixels):
        for name, value in jax.device_get(eval_fn(*args, batch)).items():
            totals[name] += value
    count = max(int(totals["count"]), 1)
    return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss_sum"]) / count}


class _MetricWriter:
    """Scalars to TensorBoard event files and to metrics.jsonl."""

    def __init__(self, workdir: str):
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._tb.close()
        self._jsonl.close()


def _augment(config: ml_collections.ConfigDict) -> Augment:
    """The dataset's standard training augmentation, or the one the config spells out."""
    options = config.augment.to_dict()
    if options.pop("standard"):
        return default_augment(config.dataset)
    return Augment(**options)


def _last_good(checkpoints: checkpoint.StateCheckpoints) -> str:
    """Where the newest checkpoint is, for error messages (every saved one is finite)."""
    step = checkpoints.latest_step()
    if step is None:
        return f"no checkpoint was saved yet in {checkpoints.directory}"
    return f"kept its last good checkpoint (step {step}) in {checkpoints.directory}"


def _train(
    config, workdir, state, train_step, teacher_variables, dataset, checkpoints, mesh, progress
):
    """Runs the steps after `state.step` up to config.num_steps; returns the final state.

    A state is saved only after the `finite` flags of the steps since the
    last log and the state itself (every floating-point leaf) are checked.
    """
    start_step = int(state.step)
    batches = train_batches(
        dataset.train,
        batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        augment=_augment(config),
        **pixel_options(dataset, config),
    )
    writer = _MetricWriter(workdir)
    progress.update(start_step)
    checked_step = start_step
    pending: list[dict[str, jax.Array]] = []
    window_start = time.perf_counter()
    try:
        for step in range(start_step + 1, config.num_steps + 1):
            batch = shard_batch(next(batches), mesh)
            state, metrics = train_step(state, teacher_variables, batch)
            pending.append(metrics)
            saves = step % config.checkpoint_every == 0 or step == config.num_steps
            if step % config.log_every and not saves:
                continue
            logged = jax.device_get(pending)
            pending = []
            if not all(m["finite"] for m in logged):
                bad = step - len(logged) + next(i for i, m in enumerate(logged) if not m["finite"])
                raise NonFiniteLossError(
                    f"the loss, its gradient or the updated state became NaN/inf at step "
                    f"{bad + 1}; the run stopped and {_last_good(checkpoints)}. Lower "
                    "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm, "
                    "and check the data for NaN/inf."
                )
            elapsed = time.perf_counter() - window_start
            window_start = time.perf_counter()
            scalars = {
                name: float(np.mean([m[name] for m in logged]))
                for name in logged[-1]
                if name != "finite"
            }
            scalars["examples_per_second"] = len(logged) * config.batch_size / max(elapsed, 1e-9)
            writer.write(step, {f"train/{k}": v for k, v in scalars.items()})
            progress.set_postfix(
                loss=f"{scalars['loss']:.4f}",
                acc=f"{scalars['accuracy']:.3f}",
                ex_s=f"{scalars['examples_per_second']:.0f}",
            )
            progress.update(len(logged))
            if not saves:
                continue
            if not _all_finite(state):
                raise NonFiniteLossError(
                    f"the train state became NaN/inf after step {checked_step} and by step "
                    f"{step}, although every step reported a finite loss and gradient; it was "
                    f"not saved, the run stopped and {_last_good(checkpoints)}. Lower "
                    "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
                )
            checked_step = step
            checkpoints.save(step, state, force=step == config.num_steps)
    finally:
        writer.close()
    return state


def is_integer_model(recipe) -> bool:
    """Whether `recipe` yields a model that runs in integers end to end.

    That needs quantized weights and quantized activations (static, learned
    or dynamic ranges: `integer_apply` runs each of them on integer operands).
    """
    return recipe.quantizes_weights and recipe.quantizes_activations


def _export(config, workdir, student, state, recipe, dataset) -> dict[str, Any]:
    """Writes the inference model to workdir/model; returns its report fields.

    `payload_bytes` is what the exported numbers cost (packed integers,
    scales, zero points and float leaves); `disk_bytes` is the orbax
    directory on disk, metadata included.
    """
    model_info = {"model": config.model.name, "model_options": config.model.options.to_dict()}
    path = os.path.join(workdir, "model")
    if not (recipe.quantizes_weights or recipe.quantizes_activations):
        checkpoint.export_model(workdir, state.variables, model_info)
        return {
            "payload_bytes": checkpoint.payload_bytes(state.variables),
            "disk_bytes": checkpoint.directory_bytes(path),
        }
    qmodel = to_quantized_model(
        state.params, recipe, state.quant_params, model_state=state.model_state
    )
    checkpoint.save_quantized(path, qmodel, metadata=model_info)
    fields = {
        "payload_bytes": checkpoint.payload_bytes(qmodel),
        "disk_bytes": checkpoint.directory_bytes(path),
    }
    if is_integer_model(recipe):
        integer_fn = jax.jit(lambda q, x: integer_apply(student, q, x))
        fields["test_accuracy_int"] = evaluate(
            lambda q, batch: classification_sums(integer_fn(q, batch["image"]), batch),
            qmodel,
            source=dataset.test,
            batch_size=config.eval_batch_size,
            **pixel_options(dataset, config),
        )["accuracy"]
    return fields


def _check_restored(state: TrainState, checkpoints: checkpoint.StateCheckpoints) -> None:
    """Refuses to resume from a checkpoint holding NaN/inf (kdq never saves one)."""
    if not _all_finite(state):
        step = checkpoints.latest_step()
        raise ValueError(
            f"checkpoint {os.path.join(checkpoints.directory, str(step))} holds NaN/inf "
            "values, so the run cannot resume from it: move that step directory away to "
            "resume from the one before, or use a new workdir"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the configured student (optionally distilled and quantized) and evaluates it.

    With config.mode == "ptq", the float model of config.init_from is
    quantized from calibration batches instead of trained.

    Every part of the run (config values, dataset, model, objective, recipe,
    pruning, teacher, optimizer, initial state, the traced train step) is
    built before workdir/config.json is written, so a config that fails
    leaves no trace that would refuse its corrected version.

    Args:
      config: a config built on `kdq.train.config.default_config()`.
      workdir: the run directory; an existing run there is resumed (with the
        same config; `progress` may differ).

    Returns:
      The final report (also written to workdir/report.json); see the README
      for its fields.
    """
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    previous = _previous_config(workdir)
    if previous is not None:
        _check_same_config(workdir, previous, current)
    run = os.path.basename(workdir)
    progress = tqdm.tqdm(
        total=config.num_steps if config.mode == "train" else None,
        disable=not config.progress,
        desc=f"{run}: prepare",
        dynamic_ncols=True,
    )
    try:
        report = _run(config, workdir, previous is None, current, progress)
    finally:
        progress.close()
    return report


def _run(config, workdir, new_run, current, progress) -> dict[str, Any]:
    """The body of `train_and_evaluate`, reporting its stage on `progress`."""
    run = os.path.basename(workdir)
    dataset = load_dataset(
        config.dataset, data_dir=config.data_dir or None, image_size=config.image_size or None
    )
    if config.batch_size > len(dataset.train):
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the {dataset.name} train "
            f"split ({len(dataset.train)} examples); lower it"
        )
    mesh = make_mesh(config.sharding.num_devices, config.sharding.model_parallel)
    if config.batch_size % mesh.shape[DATA_AXIS]:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{mesh.shape[DATA_AXIS]} data-parallel devices; choose a multiple"
        )
    objective = Objective.from_config(config.losses.to_dict())
    recipe = config_lib.quant_recipe(config)
    student = config_lib.build_model(config.model, dataset.num_classes)
    dummy = jnp.zeros((config.batch_size, *dataset.image_shape), jnp.float32)
    abstract = jax.eval_shape(student.init, jax.random.PRNGKey(0), dummy)
    config_lib.check_edge_layers(config, abstract["params"])
    teacher, teacher_variables = None, None
    if objective.needs_teacher and config.mode == "train":
        teacher, teacher_variables = load_teacher(config, dataset)
    tx = make_optimizer(config)
    state = _init_state(config, student, teacher, teacher_variables, objective, recipe, tx, dataset)
    train_step = None
    if config.mode == "train":
        train_step = make_train_step(student, objective, tx, teacher=teacher, recipe=recipe)
        batch = {
            "image": jax.ShapeDtypeStruct(dummy.shape, dummy.dtype),
            "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
        }
        # Tracing (not compiling) raises the loss terms' and the step's own errors now.
        jax.eval_shape(train_step, state, teacher_variables, batch)
    if is_integer_model(recipe):
        # The integer path checks each layer (e.g. its int32 accumulator bound)
        # when it is traced: trace it now, not after training.
        qmodel = to_quantized_model(
            state.params, recipe, state.quant_params, model_state=state.model_state
        )
        jax.eval_shape(lambda q, x: integer_apply(student, q, x), qmodel, dummy)
    if new_run:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)

    train_seconds = 0.0
    if config.mode == "train":
        progress.set_description(f"{run}: train")
        checkpoints = checkpoint.StateCheckpoints(
            os.path.join(workdir, "checkpoints"),
            keep=config.keep_checkpoints,
            every=config.checkpoint_every,
        )
        try:
            state = jax.device_put(
                state, tree_shardings(state, mesh, list(config.sharding.param_rules))
            )
            teacher_variables = jax.device_put(
                teacher_variables, tree_shardings(teacher_variables, mesh)
            )
            restored = checkpoints.restore_latest(state)
            if restored is not None:
                _check_restored(restored, checkpoints)
                state = restored
            start = time.perf_counter()
            state = _train(
                config,
                workdir,
                state,
                train_step,
                teacher_variables,
                dataset,
                checkpoints,
                mesh,
                progress,
            )
            train_seconds = time.perf_counter() - start
        finally:
            checkpoints.close()

    progress.set_description(f"{run}: evaluate")
    eval_step = make_eval_step(student, recipe=recipe)
    splits = {"test": dataset.test}
    if dataset.validation is not None:
        splits = {"val": dataset.validation, **splits}
    results = {}
    for split, source in splits.items():
        results[split] = evaluate(
            eval_step,
            state.variables,
            state.quant_params,
            source=source,
            batch_size=config.eval_batch_size,
            **pixel_options(dataset, config),
        )
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        scalars = {f"{split}/{k}": v for split, r in results.items() for k, v in r.items()}
        f.write(json.dumps({"step": int(state.step), **scalars}) + "\n")

    pruning = config_lib.prune_setup(config)
    report = {
        "model": config.model.name,
        "params": count_params(state.params),
        "seed": config.seed,
        "steps": int(state.step),
        "train_seconds": train_seconds,
    }
    for split, r in results.items():
        report.update({f"{split}_accuracy": r["accuracy"], f"{split}_loss": r["loss"]})
    if pruning is not None:
        report["sparsity"] = sparsity_of({"params": state.params}, pruning[1]).overall
    progress.set_description(f"{run}: export")
    report.update(_export(config, workdir, student, state, recipe, dataset))
    report.update(bits_summary(state.params, recipe))
    report["provenance"] = provenance()
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    progress.set_description(f"{run}: done")
    progress.set_postfix(test_acc=f"{report['test_accuracy']:.4f}")
    return report
