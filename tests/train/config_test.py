import importlib
import math
import pkgutil

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import experiments.configs
from kdq.models import create_model
from kdq.prune import PruneSpec, Pruning, one_shot_schedule, polynomial_schedule
from kdq.train import config as config_lib
from kdq.train import default_config


def _set(config, path, value):
    *sections, name = path.split(".")
    for section in sections:
        config = config[section]
    config[name] = value


# (field, bad value): every one was accepted, or failed only inside a run.
BAD_VALUES = [
    ("optimizer.learning_rate", math.inf),
    ("optimizer.learning_rate", math.nan),
    ("optimizer.learning_rate", 0.0),
    ("optimizer.weight_decay", -1.0),
    ("optimizer.weight_decay", math.nan),
    ("optimizer.weight_decay", math.inf),
    ("optimizer.grad_clip_norm", -1.0),
    ("optimizer.grad_clip_norm", math.nan),
    ("optimizer.grad_clip_norm", math.inf),
    ("optimizer.momentum", 1.0),
    ("optimizer.momentum", -0.1),
    ("optimizer.momentum", math.nan),
    ("optimizer.name", "lamb"),
    ("optimizer.schedule", "linear"),
    ("optimizer.warmup_steps", -1),
    ("prune.sparsity", 1.0),
    ("prune.sparsity", math.nan),
    ("prune.sparsity", -0.5),
    ("prune.frequency", 0),
    ("prune.begin", -1),
    ("prune.structure", "blocks"),
    ("quant.weight_bits", 17),
    ("quant.weight_bits", -1),
    ("quant.act_bits", 32),
    ("quant.act_mode", "learned"),
    ("quant.calibration_batches", 0),
    ("quant.pact_alpha_decay", -1e-4),
    ("quant.pact_alpha_decay", math.nan),
    ("seed", -1),
    ("image_size", -8),
    ("augment.crop_padding", -1),
    ("sharding.model_parallel", 0),
    ("batch_size", 0),
    ("task", "segmentation"),
    ("teacher.workdir", None),
    ("optimizer.quant_learning_rate", -1e-3),
    ("optimizer.quant_learning_rate", math.nan),
]


@pytest.mark.parametrize(("path", "value"), BAD_VALUES, ids=lambda v: str(v))
def test_bad_value_is_refused_naming_the_field(path, value):
    config = default_config()
    _set(config, path, value)
    field = config_lib.FIELDS[path]
    assert not field.accepts(value)
    with pytest.raises(ValueError, match=rf"^config\.{path} must be .*, got {value!r}$"):
        config_lib.validate(config)


def test_messages_say_what_is_accepted():
    describe = {path: field.describe() for path, field in config_lib.FIELDS.items()}
    assert describe["quant.weight_bits"] == "an integer in [0, 16] (0 keeps weights float)"
    assert describe["optimizer.learning_rate"] == "a finite number > 0"
    assert describe["optimizer.momentum"] == "a finite number in [0, 1) (sgd only)"
    assert describe["optimizer.grad_clip_norm"] == "a finite number >= 0 (0 disables clipping)"
    assert (
        describe["task"] == "one of ['classification', 'text_classification', 'language_modeling']"
    )
    assert describe["optimizer.quant_learning_rate"] == (
        "a finite number >= 0 (0 gives the quantizer state optimizer.learning_rate)"
    )


def _leaf_paths(config, prefix=""):
    for name, value in config.items():
        path = prefix + name
        if path in config_lib.FREE_FORM or not hasattr(value, "items"):
            yield path
        else:
            yield from _leaf_paths(value, path + ".")


def test_every_field_of_the_default_config_is_described():
    paths = set(_leaf_paths(default_config()))
    assert paths - set(config_lib.FREE_FORM) == set(config_lib.FIELDS)
    assert set(config_lib.FREE_FORM) <= paths


def test_the_defaults():
    config = default_config()
    assert "mode" not in config
    assert config.task == "classification"
    assert config.optimizer.quant_learning_rate == 0.0


@pytest.mark.parametrize("mode", ["train", "ptq"])
def test_mode_is_refused_pointing_to_the_ptq_entry_point(mode):
    config = default_config()
    config.mode = mode
    with pytest.raises(
        ValueError,
        match=rf"^config.mode='{mode}' is not a field: training needs no mode .*"
        r"python -m experiments.ptq --config=\.\.\. or "
        r"kdq.train.quantize_and_evaluate\(config, workdir\)",
    ):
        config_lib.validate(config)


# (field the config should not have, the names the error suggests)
UNKNOWN_FIELDS = [
    ("quant.weight_bit", "config.quant.weight_bits or config.quant.weight_mode"),
    ("optimizer.quant_lr", None),
    ("weight_bits", "config.quant.weight_bits"),
    ("model.option", "config.model.options"),
    ("teacher.workdirs", "config.teacher.workdir"),
    ("prune.sparsty", "config.prune.sparsity"),
    ("augment.flip", None),
    ("seeds", "config.seed"),
]


@pytest.mark.parametrize(("path", "suggestion"), UNKNOWN_FIELDS, ids=lambda v: str(v))
def test_unknown_field_is_refused_naming_the_closest(path, suggestion):
    config = default_config()
    _set(config, path, 1)
    section = path.rpartition(".")[0]
    where = f"config.{section}" if section else "the config"
    hint = rf"did you mean {suggestion}\b.*\? " if suggestion else ""
    with pytest.raises(
        ValueError, match=rf"^config\.{path} is not a field of {where}: {hint}its fields are \["
    ):
        config_lib.validate(config)


def test_free_form_sections_take_any_field():
    config = default_config()
    config.model.options = {"hidden": (8,), "anything": 1}
    config.teacher.options = {"widen": 2}
    config.losses = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}}
    config.sharding.param_rules = [("params/.*/kernel", (None, "model"))]
    config_lib.validate(config)


def test_a_section_replaced_by_a_value_is_refused():
    config = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    config.prune = 0.5
    with pytest.raises(ValueError, match=r"^config.prune must be a section with fields \['begin'"):
        config_lib.validate(config)


def test_bools_are_not_numbers_and_ints_are_numbers():
    assert not config_lib.FIELDS["batch_size"].accepts(True)
    assert config_lib.FIELDS["optimizer.learning_rate"].accepts(1)
    assert not config_lib.FIELDS["quant.weight_bits"].accepts(4.0)


def test_pact_alpha_decay_reaches_the_recipe():
    config = default_config()
    config.quant.act_bits, config.quant.act_mode, config.quant.act_signed = 4, "pact", False
    config.quant.pact_alpha_decay = 0.125
    assert config_lib.quant_recipe(config).pact_alpha_decay == 0.125


def test_edge_values_are_accepted():
    config = default_config()
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 0.0
    config.optimizer.momentum = 0.0
    config.prune.sparsity = 0.0
    config.quant.weight_bits = 16
    config_lib.validate(config)


def test_dependent_fields():
    config = default_config()
    config.optimizer.warmup_steps = config.num_steps
    with pytest.raises(ValueError, match=r"config.optimizer.warmup_steps must be in \[0, num"):
        config_lib.validate(config)
    config = default_config()
    config.prune.structure, config.prune.n, config.prune.m = "n:m", 3, 2
    with pytest.raises(ValueError, match=r"config.prune.n must be <= config.prune.m"):
        config_lib.validate(config)
    config = default_config()
    config.prune.structure, config.prune.begin, config.prune.end = "unstructured", 50, 10
    with pytest.raises(ValueError, match=r"config.prune.end must be > config.prune.begin"):
        config_lib.validate(config)
    config.prune.end = 50  # a gradual schedule needs end > begin
    with pytest.raises(ValueError, match=r"got begin=50, end=50; use schedule='one_shot'"):
        config_lib.validate(config)
    config.prune.schedule = "one_shot"
    config_lib.validate(config)
    config = default_config()
    config.quant.act_calibration = "absmax"
    with pytest.raises(ValueError, match=r"config.quant.act_calibration must be 'minmax', 'ema'"):
        config_lib.validate(config)
    config = default_config()
    config.optimizer.name = "adam"
    with pytest.raises(ValueError, match=r"weight_decay=0.0001 has no effect with .*'adam'"):
        config_lib.validate(config)
    config.optimizer.weight_decay = 0.0
    config_lib.validate(config)
    config.quant.lsq_init = "zeros"
    with pytest.raises(ValueError, match=r"config.quant.lsq_init must be one of"):
        config_lib.validate(config)


def test_validate_builds_nothing_and_the_builders_name_their_section():
    config = default_config()
    config.quant.weight_bits, config.quant.calibration = 4, "median"
    config_lib.validate(config)
    with pytest.raises(ValueError, match=r"^config.quant: calibration must be one of"):
        config_lib.quant_recipe(config)
    config = default_config()
    config.prune.structure, config.prune.regex = "unstructured", "conv(("
    config_lib.validate(config)
    with pytest.raises(ValueError, match=r"^config.prune: rules\[0\] regex 'params/\(conv\(\(\)'"):
        config_lib.pruning(config)
    config = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    config.prune.structure, config.prune.schedule = "channel", "cosine"
    with pytest.raises(ValueError, match=r"^config.prune: schedule must be 'one_shot' or 'poly"):
        config_lib.pruning(config)


def test_pruning_of_each_structure():
    config = default_config()
    assert config_lib.pruning(config) is None
    config.prune.structure, config.prune.sparsity, config.prune.scope = (
        "unstructured",
        0.75,
        "global",
    )
    config.prune.begin, config.prune.end, config.prune.frequency = 10, 110, 20
    pruning = config_lib.pruning(config)
    assert isinstance(pruning, Pruning)
    assert pruning.schedule == polynomial_schedule(
        initial=0.0, final=0.75, begin=10, end=110, frequency=20
    )
    assert pruning.rules == (("params/(.*kernel)", PruneSpec(structure="unstructured")),)
    assert pruning.scope == "global"
    config.prune.structure, config.prune.schedule, config.prune.importance = (
        "channel",
        "one_shot",
        "taylor",
    )
    pruning = config_lib.pruning(config)
    assert pruning.schedule == one_shot_schedule(0.75, begin=10)
    assert pruning.rules[0][1] == PruneSpec(structure="channel", importance="taylor")
    config.prune.structure, config.prune.n, config.prune.m, config.prune.regex = "n:m", 1, 4, "D.*"
    pruning = config_lib.pruning(config)
    assert pruning.schedule == one_shot_schedule(0.0, begin=10)
    assert pruning.rules == (
        ("params/(D.*)", PruneSpec(structure="n:m", n=1, m=4, importance="taylor")),
    )


def _config_modules():
    for info in pkgutil.iter_modules(experiments.configs.__path__):
        yield importlib.import_module(f"experiments.configs.{info.name}")


@pytest.mark.parametrize("module", list(_config_modules()), ids=lambda m: m.__name__)
def test_every_shipped_config_is_valid(module):
    config_lib.validate(module.get_config())


def _params(name="mlp"):
    model = create_model(name, num_classes=10)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]


def test_edge_layers_matching_no_layer_lists_the_layers():
    config = default_config()
    config.quant.weight_bits, config.quant.edge_layers = 2, "Conv_0|Dense_9"
    with pytest.raises(
        ValueError,
        match=r"config.quant.edge_layers='Conv_0\|Dense_9' matches no layer of model 'mlp'.*"
        r"\['Dense_0', 'Dense_1'\]",
    ):
        config_lib.check_edge_layers(config, _params())
    config.quant.edge_layers = "Dense_0|Dense_9"
    config_lib.check_edge_layers(config, _params())


def test_edge_layers_must_be_a_regex():
    config = default_config()
    config.quant.act_bits, config.quant.edge_layers = 8, "Dense_(0"
    with pytest.raises(
        ValueError, match=r"config.quant.edge_layers\[0\] regex 'Dense_\(0' is invalid"
    ):
        config_lib.check_edge_layers(config, _params())
