"""Linen models, each created by name: `create_model("cnn", num_classes=10)`.

Pretrained sentence encoders load by name too: `load_pretrained("all-MiniLM-L6-v2")`
(`kdq.models.pretrained`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdq.models.mobilenet import MobileNetV2, MobileNetV3Large, MobileNetV3Small
from kdq.models.pretrained import PRETRAINED_MODELS, PretrainedEncoder, load_pretrained
from kdq.models.resnet import (
    CifarResNet,
    ResNet,
    ResNet8,
    ResNet8x4,
    ResNet14,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet32x4,
    ResNet34,
    ResNet44,
    ResNet50,
    ResNet56,
    ResNet110,
)
from kdq.models.small import CNN, MLP, count_params
from kdq.models.transformer import (
    EncoderSmall,
    EncoderTiny,
    LMBase,
    LMSmall,
    LMTiny,
    TransformerEncoder,
    TransformerLM,
    init_kv_cache,
    transformer_param_count,
)
from kdq.models.wide_resnet import WideResNet, WRN16x2, WRN40x2

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    # CIFAR (RepDistiller).
    "resnet8": ResNet8,
    "resnet14": ResNet14,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet44": ResNet44,
    "resnet56": ResNet56,
    "resnet110": ResNet110,
    "resnet8x4": ResNet8x4,
    "resnet32x4": ResNet32x4,
    "wrn_16_2": WRN16x2,
    "wrn_40_2": WRN40x2,
    # ImageNet (torchvision); the ResNets take `cifar_stem=True` for 32x32 images.
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v3_small": MobileNetV3Small,
    "mobilenet_v3_large": MobileNetV3Large,
    # Token models (kdq.models.transformer): num_classes is the vocabulary of an LM.
    "transformer_lm": TransformerLM,
    "lm_tiny": LMTiny,
    "lm_small": LMSmall,
    "lm_base": LMBase,
    "transformer_encoder": TransformerEncoder,
    "encoder_tiny": EncoderTiny,
    "encoder_small": EncoderSmall,
}


def create_model(name: str, *, num_classes: int, **options: Any) -> nn.Module:
    """Builds the model registered as `name`.

    Args:
      name: a key of `MODELS`.
      num_classes: number of output logits.
      **options: the model's own attributes (e.g. `hidden=(128,)` for "mlp");
        `dtype` may be a name such as "bfloat16" (computation dtype).

    Returns:
      An unbound Linen module.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model name={name!r}; known models: {sorted(MODELS)}")
    cls = MODELS[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {sorted(unknown)}; its options are {sorted(fields)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"model {name!r} needs num_classes >= 1 (an int), got num_classes={num_classes!r}"
        )
    for option, value in options.items():
        _check_option(name, option, value)
    if isinstance(options.get("dtype"), str):
        options["dtype"] = jnp.dtype(options["dtype"])
    return cls(num_classes=num_classes, **options)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Options that are not sizes: (test, requirement) by name.
_OPTION_RULES = {
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "width_mult": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "rope_base": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "norm_eps": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "pad_id": (lambda v: v is None or (_is_int(v) and v >= 0), "None or a token id >= 0"),
    "type_vocab_size": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: no token types)"),
    "pooling": (lambda v: v in ("cls", "mean"), "'cls' or 'mean'"),
    "tie_embeddings": (lambda v: isinstance(v, bool), "a bool"),
    "approximate_gelu": (lambda v: isinstance(v, bool), "a bool"),
    "head": (lambda v: isinstance(v, bool), "a bool"),
}


def _check_option(model: str, option: str, value: Any) -> None:
    """Refuses sizes that build no network: widths, depths and counts are ints >= 1.

    An int option, or an int inside a sequence option (e.g. `hidden`,
    `channels`, `stage_sizes`), must be >= 1; the options of `_OPTION_RULES`
    (`dropout` in [0, 1), `width_mult`, `rope_base` and `norm_eps` finite and
    > 0, `pad_id` None or >= 0, `type_vocab_size` >= 0, `pooling` "cls" or
    "mean", bool flags such as `head`) follow their own rule. None (a derived default, e.g.
    `num_kv_heads`) is accepted.
    """
    if option in _OPTION_RULES:
        test, requirement = _OPTION_RULES[option]
        valid = test(value)
    else:
        ints = value if isinstance(value, list | tuple) else [value]
        valid = all(not isinstance(v, int) or isinstance(v, bool) or v >= 1 for v in ints)
        requirement = "made of ints >= 1 (sizes, depths and counts)"
    if not valid:
        raise ValueError(f"model {model!r} option {option}={value!r} must be {requirement}")


__all__ = [
    "CNN",
    "MLP",
    "MODELS",
    "CifarResNet",
    "EncoderSmall",
    "EncoderTiny",
    "LMBase",
    "LMSmall",
    "LMTiny",
    "MobileNetV2",
    "MobileNetV3Large",
    "MobileNetV3Small",
    "PRETRAINED_MODELS",
    "PretrainedEncoder",
    "ResNet",
    "ResNet8",
    "ResNet8x4",
    "ResNet14",
    "ResNet18",
    "ResNet20",
    "ResNet32",
    "ResNet32x4",
    "ResNet34",
    "ResNet44",
    "ResNet50",
    "ResNet56",
    "ResNet110",
    "TransformerEncoder",
    "TransformerLM",
    "WRN16x2",
    "WRN40x2",
    "WideResNet",
    "count_params",
    "create_model",
    "init_kv_cache",
    "load_pretrained",
    "transformer_param_count",
]
