"""The configuration schema of a kdq run, with its defaults.

Experiment configs (`experiments/configs/*.py`) start from `default_config()`
and change what they need; any field can be overridden on the command line,
e.g. `--config.seed=1 --config.quant.weight_bits=2`.
"""

from __future__ import annotations

import ml_collections

from kdq.quant import QuantSpec


def default_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (a float MLP trained on digits)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dataset = "digits"
    # "" means $KDQ_DATA_DIR or ~/.cache/kdq/tensorflow_datasets.
    config.data_dir = ""

    config.model = ml_collections.ConfigDict({"name": "mlp", "options": {}})
    # The teacher: its model and the workdir of the run that trained it.
    config.teacher = ml_collections.ConfigDict({"name": "", "options": {}, "workdir": ""})

    # Objective: {term name: {"weight": w, **loss options}}; see kdq.distill.objective.
    config.losses = ml_collections.ConfigDict({"ce": {"weight": 1.0}})

    # Weight quantization during training (QAT); weight_bits = 0 keeps float.
    config.quant = ml_collections.ConfigDict(
        {
            "weight_bits": 0,
            "weight_regex": ".*kernel",
            "per_channel": True,
            "calibration": "absmax",
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
    config.batch_size = 64
    config.num_steps = 600
    config.eval_batch_size = 256
    config.augment = ml_collections.ConfigDict({"crop_padding": 0, "horizontal_flip": False})

    config.log_every = 50
    config.checkpoint_every = 200
    config.keep_checkpoints = 2
    config.progress = True
    return config


def weight_rules(config: ml_collections.ConfigDict) -> list[tuple[str, QuantSpec]]:
    """The weight quantization rules a config asks for ([] when float)."""
    quant = config.quant
    if not quant.weight_bits:
        return []
    spec = QuantSpec(
        bits=quant.weight_bits,
        axes=(-1,) if quant.per_channel else (),
        calibration=quant.calibration,
    )
    return [(quant.weight_regex, spec)]


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
    weight_rules(config)
