"""`train_and_evaluate(config, workdir)`: a whole run, resumable at any step.

Files in `workdir`:
  config.json         the run's config (a resumed run must match it)
  checkpoints/<step>  orbax train-state checkpoints (newest `keep_checkpoints`)
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
from kdq.quant import QArray, dequantize_tree
from kdq.quant.integer import integer_apply, to_quantized_model
from kdq.quant.qat import init_quant_params
from kdq.report import median_latency_ms
from kdq.sharding import DATA_AXIS, make_mesh, shard_batch, tree_shardings
from kdq.train import config as config_lib
from kdq.train.state import TrainState
from kdq.train.step import classification_sums, make_eval_step, make_train_step


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient became NaN/inf; the run stopped before saving it."""


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


def _check_config_matches(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json, or checks that a resumed run uses the same config."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        ignored = {"progress", "num_steps"}
        changed = sorted(
            k
            for k in set(previous) | set(current)
            if k not in ignored and previous.get(k) != current.get(k)
        )
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config (fields {changed} differ); "
                "use a new --workdir, or delete the old one to start over"
            )
    with open(path, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)


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


def _train(config, workdir, state, train_step, teacher_variables, dataset, checkpoints, mesh):
    """Runs the steps after `state.step` up to config.num_steps; returns the final state."""
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
    progress = tqdm.tqdm(
        total=config.num_steps,
        initial=start_step,
        disable=not config.progress,
        desc=os.path.basename(workdir),
        dynamic_ncols=True,
    )
    pending: list[dict[str, jax.Array]] = []
    window_start = time.perf_counter()
    try:
        for step in range(start_step + 1, config.num_steps + 1):
            batch = shard_batch(next(batches), mesh)
            state, metrics = train_step(state, teacher_variables, batch)
            pending.append(metrics)
            if (
                step % config.log_every
                and step % config.checkpoint_every
                and step != config.num_steps
            ):
                continue
            logged = jax.device_get(pending)
            pending = []
            if not all(m["finite"] for m in logged):
                bad = step - len(logged) + next(i for i, m in enumerate(logged) if not m["finite"])
                raise NonFiniteLossError(
                    f"the loss or its gradient became NaN/inf at step {bad + 1}; the run stopped "
                    f"and kept its last good checkpoint (step {checkpoints.latest_step()}) in "
                    f"{checkpoints.directory}. Lower config.optimizer.learning_rate or set "
                    "config.optimizer.grad_clip_norm, and check the data for NaN/inf."
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
            checkpoints.save(step, state, force=step == config.num_steps)
    finally:
        progress.close()
        writer.close()
    return state


def _export(config, workdir, student, state, recipe, dataset) -> dict[str, Any]:
    """Writes the inference model; returns its report fields."""
    model_info = {"model": config.model.name, "model_options": config.model.options.to_dict()}
    if not (recipe.quantizes_weights or recipe.quantizes_activations):
        return {"checkpoint_bytes": checkpoint.export_model(workdir, state.variables, model_info)}
    qmodel = to_quantized_model(
        state.params, recipe, state.quant_params, model_state=state.model_state
    )
    quantized = [
        leaf
        for leaf in jax.tree_util.tree_leaves(
            qmodel.params, is_leaf=lambda x: isinstance(x, QArray)
        )
        if isinstance(leaf, QArray)
    ]
    fields = {
        "checkpoint_bytes": checkpoint.save_quantized(
            os.path.join(workdir, "model"), qmodel, metadata=model_info
        ),
        # The quantized layers alone: packed integers + scales, against float32.
        "quantized_layers_bytes": sum(q.nbytes for q in quantized),
        "quantized_layers_float_bytes": sum(4 * q.qvalue.size for q in quantized),
    }
    if not recipe.quantizes_activations or recipe.act_mode == "dynamic":
        return fields
    integer_fn = jax.jit(lambda q, x: integer_apply(student, q, x))
    int_eval = evaluate(
        lambda q, batch: classification_sums(integer_fn(q, batch["image"]), batch),
        qmodel,
        source=dataset.test,
        batch_size=config.eval_batch_size,
        **pixel_options(dataset, config),
    )
    images = next(
        eval_batches(
            dataset.test, batch_size=config.eval_batch_size, **pixel_options(dataset, config)
        )
    )["image"]
    float_fn = jax.jit(lambda v, x: student.apply(v, x))
    float_params = {"params": dequantize_tree(qmodel.params), **state.model_state}
    # Median latency of the jitted float32 and integer forward passes, side by side.
    latency = {
        str(size): {
            "float": median_latency_ms(float_fn, float_params, images[:size]),
            "int": median_latency_ms(integer_fn, qmodel, images[:size]),
        }
        for size in sorted({1, 32, int(images.shape[0])})
    }
    largest = latency[str(int(images.shape[0]))]
    fields.update(
        test_accuracy_int=int_eval["accuracy"],
        latency_ms_float=largest["float"],
        latency_ms_int=largest["int"],
        latency_batch_size=int(images.shape[0]),
        latency_ms_by_batch_size=latency,
    )
    return fields


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the configured student (optionally distilled and quantized) and evaluates it.

    With config.mode == "ptq", the float model of config.init_from is
    quantized from calibration batches instead of trained.

    Args:
      config: a config built on `kdq.train.config.default_config()`.
      workdir: the run directory; an existing run there is resumed.

    Returns:
      The final report (also written to workdir/report.json).
    """
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    dataset = load_dataset(
        config.dataset, data_dir=config.data_dir or None, image_size=config.image_size or None
    )
    if config.batch_size > len(dataset.train):
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the {dataset.name} train "
            f"split ({len(dataset.train)} examples); lower it"
        )
    _check_config_matches(workdir, config)

    objective = Objective.from_config(config.losses.to_dict())
    recipe = config_lib.quant_recipe(config)
    student = config_lib.build_model(config.model, dataset.num_classes)
    teacher, teacher_variables = None, None
    if objective.needs_teacher and config.mode == "train":
        teacher, teacher_variables = load_teacher(config, dataset)
    tx = make_optimizer(config)
    state = _init_state(config, student, teacher, teacher_variables, objective, recipe, tx, dataset)
    train_seconds = 0.0
    mesh = make_mesh(config.sharding.num_devices, config.sharding.model_parallel)
    if config.batch_size % mesh.shape[DATA_AXIS]:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{mesh.shape[DATA_AXIS]} data-parallel devices; choose a multiple"
        )
    if config.mode == "train":
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
            state = state if restored is None else restored
            train_step = make_train_step(student, objective, tx, teacher=teacher, recipe=recipe)
            start = time.perf_counter()
            state = _train(
                config, workdir, state, train_step, teacher_variables, dataset, checkpoints, mesh
            )
            train_seconds = time.perf_counter() - start
        finally:
            checkpoints.close()

    test = evaluate(
        make_eval_step(student, recipe=recipe),
        state.variables,
        state.quant_params,
        source=dataset.test,
        batch_size=config.eval_batch_size,
        **pixel_options(dataset, config),
    )
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(
            json.dumps({"step": int(state.step), **{f"test/{k}": v for k, v in test.items()}})
            + "\n"
        )

    weight_specs = [spec for _, spec in recipe.weight_rules if spec is not None]
    act_specs = [spec for _, spec in recipe.act_rules if spec is not None]
    pruning = config_lib.prune_setup(config)
    sparsity = {}
    if pruning is not None:
        sparsity["sparsity"] = sparsity_of({"params": state.params}, pruning[1]).overall
    report = {
        "model": config.model.name,
        "params": count_params(state.params),
        # The narrowest width in the recipe (edge layers may be wider).
        "weight_bits": min((spec.bits for spec in weight_specs), default=32),
        "act_bits": min((spec.bits for spec in act_specs), default=32),
        "seed": config.seed,
        "steps": int(state.step),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        **sparsity,
        "train_seconds": train_seconds,
        **_export(config, workdir, student, state, recipe, dataset),
    }
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report
