"""Builders of a run, each run once: `build(config, dataset) -> Setup`, `create_train_state`.

    setup = build(config)                        # or build(config, my_dataset)
    state = create_train_state(config, setup)
    step = make_train_step(setup.student, setup.objective, setup.tx, task=setup.task,
                           teacher=setup.teacher, recipe=setup.recipe)
    state, metrics = step(state, setup.teacher_variables, batch)

`build` raises a ValueError naming the config field for anything that cannot
be built (a recipe, a pruning setup, a model option, a batch size the data
or the devices cannot take) before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdq import checkpoint
from kdq.data import Augment, Dataset, ImageFeatures, default_augment, eval_batches, load_dataset
from kdq.distill.objective import Objective
from kdq.distill.taps import apply_with_taps
from kdq.prune import Pruning
from kdq.quant import QuantRecipe, init_quant_params
from kdq.sharding import DATA_AXIS, make_mesh
from kdq.tasks import Task, get_task
from kdq.train import config as config_lib
from kdq.train.optim import make_optimizer
from kdq.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run is made of, built once from its config.

    Attributes:
      dataset: the data (normalised when config.normalize).
      task: what a batch holds and how predictions are scored.
      student: the Linen model trained (or quantized).
      objective: the loss terms.
      recipe: how the student is quantized (`kdq.quant.FLOAT`: not at all).
      pruning: how it is pruned, or None.
      tx: the optax optimizer over `TrainState.trainable` (pruning last).
      mesh: the ("data", "model") device mesh.
      augment: the training augmentation (`config.augment`).
      teacher: the teacher model when the objective distills, else None.
      teacher_variables: its variables, restored from its run's export.
    """

    dataset: Dataset
    task: Task
    student: nn.Module
    objective: Objective
    recipe: QuantRecipe
    pruning: Pruning | None
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    augment: Augment = Augment()
    teacher: nn.Module | None = None
    teacher_variables: Any = None

    def example_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a model-ready training batch of `batch_size` examples."""
        return {
            name: jax.ShapeDtypeStruct((batch_size, *spec.shape), spec.dtype)
            for name, spec in self.dataset.features.element_spec().items()
        }

    def example_inputs(self, batch_size: int) -> Any:
        """Zero model inputs of a batch of `batch_size` (for `init` and shape tracing)."""
        zeros = {
            name: jnp.zeros(spec.shape, spec.dtype)
            for name, spec in self.example_batch(batch_size).items()
        }
        return self.task.inputs(zeros)


def check_dataset(dataset: Any) -> None:
    """ValueError unless `dataset` is a `kdq.data.Dataset`."""
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"dataset must be a kdq.data.Dataset (e.g. from kdq.data.from_arrays), got "
            f"{type(dataset).__name__}"
        )


def _dataset(config: ml_collections.ConfigDict, dataset: Dataset | None) -> Dataset:
    """The config's dataset (or the given one), normalised when config.normalize."""
    if dataset is None:
        dataset = load_dataset(
            config.dataset,
            data_dir=config.data_dir or None,
            image_size=config.image_size or None,
            seq_len=config.seq_len or None,
        )
    check_dataset(dataset)
    if config.normalize:
        if not hasattr(dataset.features, "normalized"):
            raise ValueError(
                f"config.normalize=True normalises images, but dataset {dataset.name!r} has "
                f"{type(dataset.features).__name__}; set config.normalize=False"
            )
        dataset = dataclasses.replace(dataset, features=dataset.features.normalized())
    if config.batch_size > len(dataset.train):
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the {dataset.name} train "
            f"split ({len(dataset.train)} examples); lower it"
        )
    return dataset


def _augment(config: ml_collections.ConfigDict, dataset: Dataset) -> Augment:
    """The dataset's standard training augmentation, or the one the config spells out."""
    options = config.augment.to_dict()
    augment = default_augment(dataset.name) if options.pop("standard") else Augment(**options)
    if augment.enabled and not isinstance(dataset.features, ImageFeatures):
        raise ValueError(
            f"config.augment asks for {augment}, which transforms images, but dataset "
            f"{dataset.name!r} has {type(dataset.features).__name__}; turn config.augment off"
        )
    return augment


def _mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    mesh = make_mesh(config.sharding.num_devices, config.sharding.model_parallel)
    if config.batch_size % mesh.shape[DATA_AXIS]:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{mesh.shape[DATA_AXIS]} data-parallel devices; choose a multiple"
        )
    return mesh


def check_sequence_length(
    config: ml_collections.ConfigDict, section: str, model: nn.Module
) -> None:
    """ValueError unless a model with a `max_len` can read config.seq_len tokens.

    Args:
      config: the run's config.
      section: "model" or "teacher", the config section of `model`.
      model: the built model.
    """
    max_len = getattr(model, "max_len", None)
    if config.seq_len and max_len is not None and config.seq_len > max_len:
        raise ValueError(
            f"config.seq_len={config.seq_len} is longer than config.{section} "
            f"{config[section].name!r} can read (max_len={max_len}); lower config.seq_len "
            f"or raise config.{section}.options.max_len"
        )


def load_teacher(config: ml_collections.ConfigDict, setup: Setup) -> tuple[nn.Module, Any]:
    """The teacher model of config.teacher and its variables, restored from its run's export."""
    section = config.teacher
    if not section.name or not section.workdir:
        raise ValueError(
            "the objective distills from a teacher, but config.teacher.name and "
            f"config.teacher.workdir are not both set (got name={section.name!r}, "
            f"workdir={section.workdir!r})"
        )
    teacher = config_lib.build_model(section, setup.task.num_outputs(setup.dataset))
    check_sequence_length(config, "teacher", teacher)
    template = jax.eval_shape(teacher.init, jax.random.PRNGKey(0), setup.example_inputs(1))
    return teacher, checkpoint.load_float_variables(section.workdir, template)


def build(config: ml_collections.ConfigDict, dataset: Dataset | None = None) -> Setup:
    """Builds every part of a run from its (validated) config.

    Args:
      config: a config built on `kdq.train.default_config()`, checked by
        `kdq.train.config.validate`.
      dataset: the data to use instead of `config.dataset` (e.g. from
        `kdq.data.from_arrays`); None loads `config.dataset`.

    Returns:
      The `Setup`; the teacher is loaded when the objective distills.

    The parts that need only the config (recipe, pruning, objective, task,
    mesh) are built before the data is loaded, so their errors come first.
    """
    recipe = config_lib.quant_recipe(config)
    pruning = config_lib.pruning(config)
    objective = Objective.from_config(config.losses.to_dict())
    task = get_task(config.task)
    mesh = _mesh(config)
    dataset = _dataset(config, dataset)
    student = config_lib.build_model(config.model, task.num_outputs(dataset))
    check_sequence_length(config, "model", student)
    setup = Setup(
        dataset, task, student, objective, recipe, pruning, None, mesh, _augment(config, dataset)
    )
    abstract = jax.eval_shape(
        student.init, jax.random.PRNGKey(0), setup.example_inputs(config.batch_size)
    )
    config_lib.check_edge_layers(config, abstract["params"])
    teacher, teacher_variables = (
        load_teacher(config, setup) if objective.needs_teacher else (None, None)
    )
    return dataclasses.replace(
        setup,
        tx=make_optimizer(config, pruning),
        teacher=teacher,
        teacher_variables=teacher_variables,
    )


def calibration_inputs(config: ml_collections.ConfigDict, setup: Setup) -> list[np.ndarray]:
    """The model inputs of the first `config.quant.calibration_batches` train batches, in order."""
    inputs = []
    for batch in eval_batches(setup.dataset, batch_size=config.batch_size, split="train"):
        inputs.append(setup.task.inputs(batch)[batch["mask"]])
        if len(inputs) == config.quant.calibration_batches:
            break
    return inputs


def _distill_params(setup: Setup, key: jax.Array, variables: dict[str, Any], inputs: Any) -> Any:
    """Initial parameters of the loss terms (FitNets projections), from the tapped shapes."""
    if not setup.objective.needs_teacher:
        return {}
    objective = setup.objective
    _, student_features, _ = jax.eval_shape(
        lambda v, x: apply_with_taps(setup.student, v, x, taps=objective.student_taps),
        variables,
        inputs,
    )
    _, teacher_features, _ = jax.eval_shape(
        lambda v, x: apply_with_taps(setup.teacher, v, x, taps=objective.teacher_taps),
        setup.teacher_variables,
        inputs,
    )
    return objective.init_params(key, student_features, teacher_features)


def create_train_state(config: ml_collections.ConfigDict, setup: Setup) -> TrainState:
    """The step-0 state: initialised (or `config.init_from`) params and calibrated quantizers.

    The run key PRNGKey(config.seed) splits into the init key, the key of the
    loss terms' parameters and the run key of `TrainState.key`.

    Args:
      config: the run's config.
      setup: from `build(config)`.

    Returns:
      The `TrainState`, with the optimizer state of `setup.tx`.
    """
    init_key, distill_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    inputs = setup.example_inputs(config.batch_size)
    variables = dict(jax.jit(setup.student.init)(init_key, inputs))
    if config.init_from:
        variables = checkpoint.load_float_variables(config.init_from, variables)
    quant_params = None
    if setup.recipe.quantizes_weights or setup.recipe.quantizes_activations:
        quant_params = init_quant_params(
            setup.student,
            variables,
            setup.recipe,
            calibration_inputs(config, setup),
            act_method=config.quant.act_calibration,
            lsq_init=config.quant.lsq_init,
        )
    distill_params = _distill_params(setup, distill_key, variables, inputs)
    params = variables.pop("params")
    return TrainState.create(
        params=params,
        tx=setup.tx,
        key=run_key,
        quant_params=quant_params,
        distill_params=distill_params,
        model_state=variables,
    )
