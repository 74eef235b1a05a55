"""The configuration schema of a kdq run, with its defaults.

Experiment configs (`experiments/configs/*.py`) start from `default_config()`
and change what they need; any field can be overridden on the command line,
e.g. `--config.seed=1 --config.quant.weight_bits=2`.
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from kdq.models import create_model
from kdq.prune import PruneSpec, one_shot_schedule, polynomial_schedule
from kdq.quant import QuantSpec
from kdq.quant.recipe import QuantRecipe


def default_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (a float MLP trained on digits).

    Returns:
      A `ml_collections.ConfigDict`; see the comments in this function.
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dataset = "digits"
    # "" means $KDQ_DATA_DIR or ~/.cache/kdq/tensorflow_datasets.
    config.data_dir = ""

    # A model: its registered name, its options, and its computation dtype
    # ("" keeps the model's default; e.g. "bfloat16" on GPU/TPU).
    config.model = ml_collections.ConfigDict({"name": "mlp", "options": {}, "dtype": ""})
    # The teacher: its model and the workdir of the run that trained it.
    config.teacher = ml_collections.ConfigDict(
        {"name": "", "options": {}, "dtype": "", "workdir": ""}
    )

    # Objective: {term name: {"weight": w, **loss options}}; see kdq.distill.objective.
    config.losses = ml_collections.ConfigDict({"ce": {"weight": 1.0}})

    # "train": train (QAT when quant asks for it); "ptq": quantize the float
    # model of `init_from` after training, without training.
    config.mode = "train"
    # Workdir of a finished float run whose exported params initialise the model.
    config.init_from = ""

    # Quantization; weight_bits = 0 / act_bits = 0 keep weights / activations float.
    config.quant = ml_collections.ConfigDict(
        {
            "weight_bits": 0,
            "weight_regex": ".*kernel",  # over param paths
            "per_channel": True,
            "calibration": "absmax",  # absmax | minmax | percentile,<p> | mse
            "weight_mode": "calibrated",  # calibrated | lsq
            "act_bits": 0,
            "act_regex": ".*",  # over module paths (inputs of Dense/Conv/Einsum)
            "act_signed": True,
            "act_mode": "dynamic",  # dynamic | static | lsq | pact
            "act_calibration": "minmax",  # minmax | ema | percentile,<p>
            "calibration_batches": 4,
            # Module-path regex of layers kept at 8-bit weights and inputs (e.g.
            # the first and last layer, as is usual below 4 bits); "" for none.
            "edge_layers": "",
        }
    )

    # Pruning during training; structure "none" disables it. The optax pruning
    # transform runs after the optimizer, so pruned weights stay exactly zero.
    config.prune = ml_collections.ConfigDict(
        {
            "structure": "none",  # none | unstructured | channel | n:m
            "sparsity": 0.5,  # final sparsity (unstructured / channel)
            "n": 2,  # n:m: keep n of every m along the input axis
            "m": 4,
            "regex": ".*kernel",  # over param paths
            "scope": "layer",  # layer | global (unstructured)
            "importance": "magnitude",  # magnitude | taylor
            "schedule": "polynomial",  # one_shot | polynomial
            "begin": 0,
            "end": 200,  # polynomial: sparsity reaches its final value here
            "frequency": 20,
        }
    )

    config.optimizer = ml_collections.ConfigDict(
        {
            "name": "adamw",  # adamw | adam | sgd
            "learning_rate": 3e-3,
            "weight_decay": 1e-4,
            "momentum": 0.9,  # sgd only
            "warmup_steps": 20,
            "schedule": "cosine",  # cosine | constant
            "grad_clip_norm": 0.0,  # 0 disables clipping
        }
    )
    # Devices: a ("data", "model") mesh; the batch is split over "data", the
    # state replicated except leaves matched by param_rules, a list of
    # (regex over state paths, partition spec tuple), e.g.
    # [("params/.*/kernel", (None, "model"))] with model_parallel = 2.
    config.sharding = ml_collections.ConfigDict(
        {"num_devices": 0, "model_parallel": 1, "param_rules": ()}
    )
    # Multi-host jobs (cloud TPU pods): experiments/main.py then calls
    # jax.distributed.initialize() before anything else.
    config.distributed = False

    config.batch_size = 64
    config.num_steps = 600
    config.eval_batch_size = 256
    # Image side for datasets resized on load (0: the dataset's own, 224 for
    # imagenet2012); per-channel mean/std normalisation of catalog datasets.
    config.image_size = 0
    config.normalize = False
    # standard=True: the dataset's usual training augmentation (CIFAR crop +
    # flip, ImageNet Inception crop + flip) instead of the fields below.
    config.augment = ml_collections.ConfigDict(
        {"standard": False, "crop_padding": 0, "horizontal_flip": False, "inception_crop": False}
    )

    config.log_every = 50
    config.checkpoint_every = 200
    config.keep_checkpoints = 2
    config.progress = True
    return config


def build_model(section: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model a config section ({"name", "options", "dtype"}) describes.

    Args:
      section: `config.model` or `config.teacher`.
      num_classes: number of output logits.

    Returns:
      The unbound Linen model.
    """
    options = section.options.to_dict()
    if section.dtype:
        options["dtype"] = section.dtype
    return create_model(section.name, num_classes=num_classes, **options)


def quant_recipe(config: ml_collections.ConfigDict) -> QuantRecipe:
    """The quantization recipe a config asks for (empty rules when float).

    Args:
      config: a run config (its `quant` section).

    Returns:
      The `QuantRecipe`.
    """
    quant = config.quant
    weight_rules, act_rules = [], []
    axes = (-1,) if quant.per_channel else ()
    if quant.weight_bits:
        if quant.edge_layers:
            edge_spec = QuantSpec(bits=8, axes=axes, calibration=quant.calibration)
            weight_rules.append((f"({quant.edge_layers})/kernel", edge_spec))
        spec = QuantSpec(bits=quant.weight_bits, axes=axes, calibration=quant.calibration)
        weight_rules.append((quant.weight_regex, spec))
    if quant.act_bits:
        if quant.edge_layers:
            act_rules.append((quant.edge_layers, QuantSpec(bits=8, signed=quant.act_signed)))
        act_rules.append((quant.act_regex, QuantSpec(bits=quant.act_bits, signed=quant.act_signed)))
    return QuantRecipe(
        weight_rules=weight_rules,
        act_rules=act_rules,
        weight_mode=quant.weight_mode,
        act_mode=quant.act_mode,
    )


def prune_setup(config: ml_collections.ConfigDict):
    """(schedule, rules, scope) of the pruning a config asks for, or None."""
    prune = config.prune
    if prune.structure == "none":
        return None
    if prune.structure == "n:m":
        spec = PruneSpec(structure="n:m", n=prune.n, m=prune.m, importance=prune.importance)
        schedule = one_shot_schedule(0.0, begin=prune.begin)
    else:
        spec = PruneSpec(structure=prune.structure, importance=prune.importance)
        if prune.schedule == "one_shot":
            schedule = one_shot_schedule(prune.sparsity, begin=prune.begin)
        elif prune.schedule == "polynomial":
            schedule = polynomial_schedule(
                initial=0.0,
                final=prune.sparsity,
                begin=prune.begin,
                end=prune.end,
                frequency=prune.frequency,
            )
        else:
            raise ValueError(
                f"config.prune.schedule must be 'one_shot' or 'polynomial', got {prune.schedule!r}"
            )
    # The optimizer sees {"params", "quant", "distill"}: prune only the params.
    return schedule, [(f"params/{prune.regex}", spec)], prune.scope


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the values a run depends on; raises ValueError naming the field."""
    positive = {
        "batch_size": config.batch_size,
        "num_steps": config.num_steps,
        "eval_batch_size": config.eval_batch_size,
        "log_every": config.log_every,
        "checkpoint_every": config.checkpoint_every,
        "keep_checkpoints": config.keep_checkpoints,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
    opt = config.optimizer
    if not opt.learning_rate > 0:
        raise ValueError(f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate!r}")
    if opt.warmup_steps < 0 or opt.warmup_steps >= config.num_steps:
        raise ValueError(
            f"config.optimizer.warmup_steps must be in [0, num_steps={config.num_steps}), "
            f"got {opt.warmup_steps!r}"
        )
    if config.mode not in ("train", "ptq"):
        raise ValueError(f"config.mode must be 'train' or 'ptq', got {config.mode!r}")
    if config.mode == "ptq" and not config.init_from:
        raise ValueError("config.mode='ptq' quantizes a trained model: set config.init_from")
    if config.quant.calibration_batches < 1:
        raise ValueError(
            "config.quant.calibration_batches must be >= 1, got "
            f"{config.quant.calibration_batches!r}"
        )
    quant_recipe(config)
    prune_setup(config)
