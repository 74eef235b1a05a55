import importlib
import math
import pkgutil

import jax
import jax.numpy as jnp
import pytest

import experiments.configs
from kdq.models import create_model
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
    ("mode", "finetune"),
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
    assert describe["mode"] == "one of ['train', 'ptq']"


def test_every_field_of_the_default_config_is_described():
    config = default_config()
    sections = ("quant", "prune", "optimizer", "augment", "sharding")
    top = {k for k, v in config.items() if not hasattr(v, "items")}
    nested = {f"{s}.{k}" for s in sections for k in config[s]}
    assert top | nested - {"sharding.param_rules"} == set(config_lib.FIELDS)


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
    with pytest.raises(ValueError, match=r"config.prune.end must be >= config.prune.begin"):
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
    config = default_config()
    config.quant.weight_bits, config.quant.calibration = 4, "median"
    with pytest.raises(ValueError, match=r"^config.quant: calibration must be one of"):
        config_lib.validate(config)


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
