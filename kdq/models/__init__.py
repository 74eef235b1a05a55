"""Linen models, each created by name: `create_model("cnn", num_classes=10)`."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdq.models.mobilenet import MobileNetV2, MobileNetV3Large, MobileNetV3Small
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


def _check_option(model: str, option: str, value: Any) -> None:
    """Refuses sizes that build no network: widths, depths and counts are ints >= 1.

    An int option, or an int inside a sequence option (e.g. `hidden`,
    `channels`, `stage_sizes`), must be >= 1; `dropout` must lie in [0, 1)
    and `width_mult` be a finite number > 0.
    """
    if option == "dropout":
        valid = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1
        requirement = "a number in [0, 1)"
    elif option == "width_mult":
        valid = isinstance(value, int | float) and not isinstance(value, bool)
        valid = valid and math.isfinite(value) and value > 0
        requirement = "a finite number > 0"
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
    "MobileNetV2",
    "MobileNetV3Large",
    "MobileNetV3Small",
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
    "WRN16x2",
    "WRN40x2",
    "WideResNet",
    "count_params",
    "create_model",
]
