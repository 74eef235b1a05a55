"""The configuration schema of a kdq run, with its defaults.

Experiment configs (`experiments/configs/*.py`) start from `default_config()`
and change what they need; any field can be overridden on the command line,
e.g. `--config.seed=1 --config.quant.weight_bits=2`. `validate` checks every
field against `FIELDS` (kind, range, finiteness) and refuses fields the schema
does not have, before a run builds anything. The builders `quant_recipe`,
`pruning` and `build_model` turn sections into kdq objects; each raises a
ValueError prefixed with its section (`config.quant: ...`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
from collections.abc import Collection, Iterator
from typing import Any

import flax.linen as nn
import ml_collections

from kdq.models import create_model
from kdq.prune import PruneSpec, Pruning, SparsitySchedule, one_shot_schedule, polynomial_schedule
from kdq.prune.masks import IMPORTANCES, SCOPES, STRUCTURES
from kdq.quant import QuantSpec
from kdq.quant.qat import LSQ_INITS
from kdq.quant.quantizers import ACT_QUANTIZERS, WEIGHT_QUANTIZERS
from kdq.quant.recipe import DEFAULT_PACT_ALPHA_DECAY, QuantRecipe
from kdq.rules import PathRules, tree_paths
from kdq.sharding import PARAM_RULES
from kdq.tasks import TASKS

# The entry points a config is written for (`config.entry_point`).
ENTRY_POINTS = ("train", "ptq")
# The names `config.task` accepts: the tasks of `kdq.tasks.TASKS`.
TASK_NAMES = tuple(TASKS)


def default_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (a float MLP trained on digits).

    Returns:
      A `ml_collections.ConfigDict`; see the comments in this function and in
      the section builders it calls.
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dataset = "digits"
    # "" means $KDQ_DATA_DIR or ~/.cache/kdq/tensorflow_datasets.
    config.data_dir = ""
    # What is learned from the dataset (a name of kdq.tasks.TASKS): what a
    # batch holds, the targets, the metrics and the evaluation sums.
    config.task = "classification"

    # A model: its registered name, its options, and its computation dtype
    # ("" keeps the model's default; e.g. "bfloat16" on GPU/TPU).
    config.model = ml_collections.ConfigDict({"name": "mlp", "options": {}, "dtype": ""})
    # The teacher: its model and the workdir of the run that trained it.
    config.teacher = ml_collections.ConfigDict(
        {"name": "", "options": {}, "dtype": "", "workdir": ""}
    )

    # Objective: {term name: {"weight": w, **loss options}}; see kdq.distill.objective.
    config.losses = ml_collections.ConfigDict({"ce": {"weight": 1.0}})

    # Workdir of a finished float run whose exported params initialise the model.
    config.init_from = ""
    # The entry point the config is written for: "train" (train_and_evaluate,
    # python -m experiments.main) or "ptq" (quantize_and_evaluate, python -m
    # experiments.ptq: calibrate init_from's model, train nothing). Each entry
    # point refuses the other's configs and workdirs.
    config.entry_point = "train"

    config.quant = _quant_section()
    config.prune = _prune_section()
    config.optimizer = _optimizer_section()
    config.sharding = _sharding_section()
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
    # Tokens per window of a text dataset (language modelling: the model reads
    # seq_len tokens and predicts the next seq_len); 0 for other datasets.
    config.seq_len = 0
    config.generated = _generated_section()
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


def _sharding_section() -> ml_collections.ConfigDict:
    """Devices: a ("data", "model") mesh; the batch is split over "data".

    The state is replicated except the leaves matched by `param_rules`, a list
    of (regex over state paths, partition spec tuple), e.g.
    [("params/.*/kernel", (None, "model"))] with model_parallel = 2, and then
    by the transformer rules of `strategy` ("none", "fsdp" or "tensor",
    `kdq.sharding.PARAM_RULES`); the first matching rule wins.
    """
    return ml_collections.ConfigDict(
        {"num_devices": 0, "model_parallel": 1, "param_rules": (), "strategy": "none"}
    )


def _generated_section() -> ml_collections.ConfigDict:
    """Generated training text for language models; source "none" disables it.

    A `fraction` of training batches keep the first `prompt_len` tokens of each
    window and the rest is sampled ("student": on-policy distillation, GKD;
    "teacher": sequence-level KD) at `temperature` from the `top_k` likeliest
    tokens (0: all); see `kdq.train.lm`.
    """
    return ml_collections.ConfigDict(
        {"source": "none", "fraction": 0.5, "prompt_len": 32, "temperature": 1.0, "top_k": 0}
    )


def _quant_section() -> ml_collections.ConfigDict:
    """Quantization; weight_bits = 0 / act_bits = 0 keep weights / activations float."""
    return ml_collections.ConfigDict(
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
            # lambda of PACT's L2 penalty lambda * sum alpha^2 on the clipping
            # values (act_mode "pact"), as in Choi et al. 2018.
            "pact_alpha_decay": DEFAULT_PACT_ALPHA_DECAY,
            # Initial LSQ steps: "calibration" (the calibrated scales, so QAT
            # starts from the PTQ model with no weight clipped) or "paper"
            # (2 <|v|> / sqrt(Q_P), Esser et al. 2020).
            "lsq_init": "calibration",
            # Weight scales per group of this many contraction-axis entries (0:
            # one scale per output channel, or per tensor without per_channel).
            "group_size": 0,
            # One activation scale per (example, token) row of a (B, T, D)
            # input, from the current batch (act_mode "dynamic" only).
            "act_per_token": False,
        }
    )


def _prune_section() -> ml_collections.ConfigDict:
    """Pruning during training; structure "none" disables it.

    The optax pruning transform runs after the optimizer, so pruned weights
    stay exactly zero.
    """
    return ml_collections.ConfigDict(
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
            # heads / neurons: rows pruned together (a head's width; 0: one row).
            "group_size": 0,
        }
    )


def _optimizer_section() -> ml_collections.ConfigDict:
    """The optimizer and its learning-rate schedule (see `kdq.train.optim`)."""
    return ml_collections.ConfigDict(
        {
            "name": "adamw",  # adamw | adam | sgd
            "learning_rate": 3e-3,
            # Peak learning rate of the learned quantizer state (LSQ steps,
            # PACT clips), under the same warmup and schedule; 0 gives it
            # learning_rate, like the params.
            "quant_learning_rate": 0.0,
            "weight_decay": 1e-4,
            "momentum": 0.9,  # sgd only
            "warmup_steps": 20,
            "schedule": "cosine",  # cosine | constant
            "grad_clip_norm": 0.0,  # 0 disables clipping
        }
    )


def build_model(section: ml_collections.ConfigDict, num_outputs: int) -> nn.Module:
    """The model a config section ({"name", "options", "dtype"}) describes.

    Args:
      section: `config.model` or `config.teacher`.
      num_outputs: number of output logits (the model's `num_classes`).

    Returns:
      The unbound Linen model.
    """
    options = section.options.to_dict()
    if section.dtype:
        options["dtype"] = section.dtype
    return create_model(section.name, num_classes=num_outputs, **options)


@contextlib.contextmanager
def _building(section: str) -> Iterator[None]:
    """Prefixes a ValueError raised while building `config.<section>` with that section."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"config.{section}: {e}") from None


def quant_recipe(config: ml_collections.ConfigDict) -> QuantRecipe:
    """The quantization recipe a config asks for (empty rules when float).

    Args:
      config: a run config (its `quant` section).

    Returns:
      The `QuantRecipe`.

    Raises:
      ValueError: "config.quant: ..." when the section makes no valid recipe
        (e.g. an unknown calibration method).
    """
    quant = config.quant
    weight_rules, act_rules = [], []
    axes = (-1,) if quant.per_channel else ()
    with _building("quant"):
        if quant.weight_bits:
            if quant.edge_layers:
                edge_spec = QuantSpec(bits=8, axes=axes, calibration=quant.calibration)
                weight_rules.append((f"({quant.edge_layers})/kernel", edge_spec))
            spec = QuantSpec(
                bits=quant.weight_bits,
                axes=axes,
                group_size=quant.group_size or None,
                calibration=quant.calibration,
            )
            weight_rules.append((quant.weight_regex, spec))
        if quant.act_bits:
            act_axes = (0, 1) if quant.act_per_token else ()
            if quant.edge_layers:
                edge_act = QuantSpec(bits=8, signed=quant.act_signed, axes=act_axes)
                act_rules.append((quant.edge_layers, edge_act))
            act_spec = QuantSpec(bits=quant.act_bits, signed=quant.act_signed, axes=act_axes)
            act_rules.append((quant.act_regex, act_spec))
        return QuantRecipe(
            weight_rules=weight_rules,
            act_rules=act_rules,
            weight_mode=quant.weight_mode,
            act_mode=quant.act_mode,
            pact_alpha_decay=quant.pact_alpha_decay,
        )


def _sparsity_schedule(prune: ml_collections.ConfigDict) -> SparsitySchedule:
    """The schedule of every structure but "n:m": one-shot or polynomial."""
    if prune.schedule == "one_shot":
        return one_shot_schedule(prune.sparsity, begin=prune.begin)
    if prune.schedule == "polynomial":
        return polynomial_schedule(
            initial=0.0,
            final=prune.sparsity,
            begin=prune.begin,
            end=prune.end,
            frequency=prune.frequency,
        )
    raise ValueError(f"schedule must be 'one_shot' or 'polynomial', got {prune.schedule!r}")


def pruning(config: ml_collections.ConfigDict) -> Pruning | None:
    """The pruning a config asks for, or None when config.prune.structure is "none".

    "unstructured", "channel", "heads" and "neurons" pruning (the last two:
    groups of config.prune.group_size rows of the selected kernels, see
    `kdq.prune.PruneSpec`) reach config.prune.sparsity on the
    one-shot or polynomial schedule; "n:m" applies its fixed pattern (sparsity
    1 - n/m) at every step from config.prune.begin on. The one rule selects
    "params/(<config.prune.regex>)" of the trainable tree, so only the
    model's params are pruned, never the quantizer or loss state.

    Args:
      config: a run config (its `prune` section).

    Returns:
      The `kdq.prune.Pruning`, or None.

    Raises:
      ValueError: "config.prune: ..." when the section makes no valid pruning.
    """
    prune = config.prune
    if prune.structure == "none":
        return None
    with _building("prune"):
        if prune.structure == "n:m":
            spec = PruneSpec(structure="n:m", n=prune.n, m=prune.m, importance=prune.importance)
            schedule = one_shot_schedule(0.0, begin=prune.begin)
        else:
            spec = PruneSpec(
                structure=prune.structure,
                importance=prune.importance,
                group_size=prune.group_size or None,
            )
            schedule = _sparsity_schedule(prune)
        return Pruning(schedule, ((f"params/({prune.regex})", spec),), prune.scope)


@dataclasses.dataclass(frozen=True)
class Field:
    """What one config field accepts.

    Attributes:
      kind: "int", "float" (a finite int or float), "bool", "str" or "choice".
      low, high: inclusive bounds of an "int" or "float" (None: unbounded).
      low_open, high_open: make the bound exclusive.
      choices: the accepted strings of a "choice" (a live collection, e.g. a
        registry dict, so names registered later are accepted too).
      note: what the values mean, appended to the description.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: Collection[str] = ()
    note: str = ""

    def describe(self) -> str:
        """The accepted values in words, e.g. "an integer in [0, 16] (0 keeps weights float)"."""
        if self.kind == "bool":
            text = "True or False"
        elif self.kind == "str":
            text = "a string"
        elif self.kind == "choice":
            text = f"one of {list(self.choices)}"
        else:
            text = "an integer" if self.kind == "int" else "a finite number"
            if self.low is not None and self.high is not None:
                text += (
                    f" in {'(' if self.low_open else '['}{self.low}, "
                    f"{self.high}{')' if self.high_open else ']'}"
                )
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low}"
        return f"{text} ({self.note})" if self.note else text

    def accepts(self, value: Any) -> bool:
        """Whether `value` is of the field's kind and within its range."""
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        number = int | float if self.kind == "float" else int
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


_COUNT = Field("int", low=1)
_STEP = Field("int", low=0)
_FLAG = Field("bool")
_TEXT = Field("str")

# Every field of the schema but the free-form ones below: its name, kind and
# range.
FIELDS: dict[str, Field] = {
    "seed": Field("int", low=0),
    "dataset": _TEXT,
    "data_dir": _TEXT,
    "task": Field("choice", choices=TASK_NAMES),
    "entry_point": Field("choice", choices=ENTRY_POINTS),
    "model.name": _TEXT,
    "model.dtype": _TEXT,
    "teacher.name": _TEXT,
    "teacher.dtype": _TEXT,
    "teacher.workdir": _TEXT,
    "init_from": _TEXT,
    "distributed": _FLAG,
    "batch_size": _COUNT,
    "num_steps": _COUNT,
    "eval_batch_size": _COUNT,
    "image_size": Field("int", low=0, note="0 keeps the dataset's own size"),
    "seq_len": Field("int", low=0, note="tokens per window of a text dataset; 0 otherwise"),
    "generated.source": Field("choice", choices=("none", "student", "teacher")),
    "generated.fraction": Field("float", low=0, high=1, low_open=True),
    "generated.prompt_len": _COUNT,
    "generated.temperature": Field("float", low=0, low_open=True),
    "generated.top_k": Field("int", low=0, note="0 samples from the whole vocabulary"),
    "normalize": _FLAG,
    "log_every": _COUNT,
    "checkpoint_every": _COUNT,
    "keep_checkpoints": _COUNT,
    "progress": _FLAG,
    "augment.standard": _FLAG,
    "augment.crop_padding": Field("int", low=0),
    "augment.horizontal_flip": _FLAG,
    "augment.inception_crop": _FLAG,
    "sharding.num_devices": Field("int", low=0, note="0 uses every device"),
    "sharding.model_parallel": _COUNT,
    "sharding.strategy": Field("choice", choices=PARAM_RULES),
    "quant.weight_bits": Field("int", low=0, high=16, note="0 keeps weights float"),
    "quant.weight_regex": _TEXT,
    "quant.per_channel": _FLAG,
    "quant.calibration": _TEXT,
    "quant.weight_mode": Field("choice", choices=WEIGHT_QUANTIZERS),
    "quant.act_bits": Field("int", low=0, high=16, note="0 keeps activations float"),
    "quant.act_regex": _TEXT,
    "quant.act_signed": _FLAG,
    "quant.act_mode": Field("choice", choices=ACT_QUANTIZERS),
    "quant.act_calibration": _TEXT,
    "quant.calibration_batches": _COUNT,
    "quant.edge_layers": _TEXT,
    "quant.pact_alpha_decay": Field("float", low=0, note="act_mode 'pact' only"),
    "quant.lsq_init": Field("choice", choices=LSQ_INITS),
    "quant.group_size": Field("int", low=0, note="0: per channel or per tensor"),
    "quant.act_per_token": _FLAG,
    "prune.structure": Field("choice", choices=("none", *STRUCTURES)),
    "prune.sparsity": Field("float", low=0, high=1, high_open=True),
    "prune.n": _COUNT,
    "prune.m": _COUNT,
    "prune.regex": _TEXT,
    "prune.scope": Field("choice", choices=SCOPES),
    "prune.importance": Field("choice", choices=IMPORTANCES),
    "prune.schedule": Field("choice", choices=("one_shot", "polynomial")),
    "prune.begin": _STEP,
    "prune.end": _STEP,
    "prune.frequency": _COUNT,
    "prune.group_size": Field("int", low=0, note="heads: the head width; 0: one row"),
    "optimizer.name": Field("choice", choices=("adamw", "adam", "sgd")),
    "optimizer.learning_rate": Field("float", low=0, low_open=True),
    "optimizer.quant_learning_rate": Field(
        "float", low=0, note="0 gives the quantizer state optimizer.learning_rate"
    ),
    "optimizer.weight_decay": Field("float", low=0),
    "optimizer.momentum": Field("float", low=0, high=1, high_open=True, note="sgd only"),
    "optimizer.warmup_steps": _STEP,
    "optimizer.schedule": Field("choice", choices=("cosine", "constant")),
    "optimizer.grad_clip_norm": Field("float", low=0, note="0 disables clipping"),
}

# The free-form fields: any content, checked where it is used (the model
# registry knows each model's options, the objective each loss's, the mesh the
# partition rules).
FREE_FORM = ("model.options", "teacher.options", "losses", "sharding.param_rules")


def field_value(config: ml_collections.ConfigDict, path: str) -> Any:
    """The value of a dotted field path, e.g. "quant.weight_bits".

    Raises:
      ValueError: the config has no such field.
    """
    value = config
    for part in path.split("."):
        if part not in value:
            raise ValueError(
                f"config.{path} is missing; build the config on "
                "kdq.train.default_config() and change only the fields you need"
            )
        value = value[part]
    return value


def _schema_names(prefix: str) -> list[str]:
    """The field and section names the schema has directly under `prefix` ("" or "quant.")."""
    paths = (*FIELDS, *FREE_FORM)
    return sorted({p[len(prefix) :].split(".")[0] for p in paths if p.startswith(prefix)})


def _unknown_field(path: str, known: list[str], prefix: str) -> ValueError:
    """The error for `config.<path>`, which the schema does not have, with the closest names."""
    name = path[len(prefix) :]
    close = [prefix + match for match in difflib.get_close_matches(name, known)]
    if not close:
        tails: dict[str, list[str]] = {}
        for field in FIELDS:
            tails.setdefault(field.rsplit(".", 1)[-1], []).append(field)
        close = [field for tail in difflib.get_close_matches(name, tails) for field in tails[tail]]
    hint = f"did you mean {' or '.join(f'config.{p}' for p in close)}? " if close else ""
    where = f"config.{prefix[:-1]}" if prefix else "the config"
    return ValueError(
        f"config.{path} is not a field of {where}: {hint}its fields are {known} "
        "(see kdq.train.config.FIELDS)"
    )


def _check_known_fields(config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Refuses a field the schema does not have, at the top level and in every section."""
    known = _schema_names(prefix)
    for name in config:
        path = prefix + name
        if name not in known:
            raise _unknown_field(path, known, prefix)
        if path in FIELDS or path in FREE_FORM:
            continue
        section = config[name]
        if not isinstance(section, ml_collections.ConfigDict | dict):
            raise ValueError(
                f"config.{path} must be a section with fields {_schema_names(path + '.')}, "
                f"got {section!r}"
            )
        _check_known_fields(section, path + ".")


def _check_no_mode(config: ml_collections.ConfigDict) -> None:
    """Refuses `config.mode`: training has no modes and PTQ has its own entry point."""
    if "mode" in config:
        raise ValueError(
            f"config.mode={config['mode']!r} is not a field: training needs no mode (it "
            "quantizes as config.quant says, QAT included), and post-training quantization "
            "is its own entry point: set config.entry_point='ptq' and run python -m "
            "experiments.ptq --config=... or kdq.train.quantize_and_evaluate(config, "
            "workdir). Remove config.mode"
        )


def _spec_calibration(text: str) -> str | None:
    """The method name of a `QuantSpec.calibration` string, or None when it is not one."""
    try:
        return QuantSpec(calibration=text).calibration_method
    except ValueError:
        return None


def _check_dependent_fields(config: ml_collections.ConfigDict) -> None:
    """Checks the fields whose valid values depend on other fields."""
    opt = config.optimizer
    if opt.name == "adam" and opt.weight_decay:
        raise ValueError(
            f"config.optimizer.weight_decay={opt.weight_decay!r} has no effect with "
            "config.optimizer.name='adam' (Adam without decoupled weight decay): set it to 0, "
            "or use 'adamw'"
        )
    if opt.warmup_steps >= config.num_steps:
        raise ValueError(
            f"config.optimizer.warmup_steps must be in [0, num_steps={config.num_steps}), "
            f"got {opt.warmup_steps!r}"
        )
    prune = config.prune
    if prune.structure == "n:m" and prune.n > prune.m:
        raise ValueError(
            f"config.prune.n must be <= config.prune.m (n non-zeros in every group of m), "
            f"got n={prune.n}, m={prune.m}"
        )
    if prune.structure != "n:m" and prune.schedule == "polynomial" and (prune.end <= prune.begin):
        raise ValueError(
            f"config.prune.end must be > config.prune.begin (a gradual schedule), got "
            f"begin={prune.begin}, end={prune.end}; use schedule='one_shot' to prune at once"
        )
    quant = config.quant
    if quant.act_per_token and quant.act_bits and quant.act_mode != "dynamic":
        raise ValueError(
            f"config.quant.act_per_token=True needs act_mode='dynamic' (a scale per token of "
            f"the current batch), got act_mode={quant.act_mode!r}"
        )
    if quant.group_size and quant.weight_bits and not quant.per_channel:
        raise ValueError(
            f"config.quant.group_size={quant.group_size} needs per_channel=True (groups split "
            "each output channel's contraction axis)"
        )
    generated = config.generated
    if generated.source != "none" and generated.prompt_len >= config.seq_len:
        raise ValueError(
            f"config.generated.prompt_len={generated.prompt_len} must be < config.seq_len="
            f"{config.seq_len}: the text after the prompt is generated"
        )
    act_calibration = config.quant.act_calibration
    if act_calibration != "ema" and _spec_calibration(act_calibration) not in (
        "minmax",
        "percentile",
    ):
        raise ValueError(
            "config.quant.act_calibration must be 'minmax', 'ema' or 'percentile,<p>' "
            f"with 0 < p <= 100, got {act_calibration!r}"
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field a run depends on, before anything is built or compiled.

    The config must have exactly the schema's fields (`FIELDS` and the
    free-form `FREE_FORM`; a misspelled field is refused with the closest
    names, and so is `mode`: PTQ is its own entry point). Each field of
    `FIELDS` must be of its kind and within its range (numbers finite: NaN
    and inf are refused everywhere); then the fields that depend on each other
    are checked. Nothing is built: the builders (`quant_recipe`, `pruning`,
    `build_model`, `kdq.train.optim.make_optimizer`) check what only building
    shows, with the section in their errors.

    Args:
      config: a run config.

    Raises:
      ValueError: naming the field (`config.<path>`), its value and what it accepts.
    """
    _check_no_mode(config)
    _check_known_fields(config)
    for path, field in FIELDS.items():
        value = field_value(config, path)
        if not field.accepts(value):
            raise ValueError(f"config.{path} must be {field.describe()}, got {value!r}")
    _check_dependent_fields(config)


def check_edge_layers(config: ml_collections.ConfigDict, params: Any) -> None:
    """Checks that config.quant.edge_layers selects at least one layer of the model.

    Args:
      config: a run config.
      params: the student's params (arrays or ShapeDtypeStructs).

    Raises:
      ValueError: the regex matches no layer with a kernel (lists the
        layers), or it is not a valid regex.
    """
    edge = config.quant.edge_layers
    if not edge or not (config.quant.weight_bits or config.quant.act_bits):
        return
    layers = sorted(
        path.removesuffix("/kernel") for path in tree_paths(params) if path.endswith("/kernel")
    )
    rules = PathRules([(edge, True)], bool, name="config.quant.edge_layers")
    if all(rules.lookup(layer)[0] is None for layer in layers):
        raise ValueError(
            f"config.quant.edge_layers={edge!r} matches no layer of model "
            f"{config.model.name!r} (a regex over module paths, matched in full); its layers "
            f"are {layers}"
        )
