"""Linen models, each created by name: `create_model("cnn", num_classes=10)`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from kdq.models.small import CNN, MLP, count_params

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN}


def create_model(name: str, *, num_classes: int, **options: Any) -> nn.Module:
    """Builds the model registered as `name`.

    Args:
      name: a key of `MODELS`.
      num_classes: number of output logits.
      **options: the model's own attributes (e.g. `hidden=(128,)` for "mlp").

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
    return cls(num_classes=num_classes, **options)


__all__ = ["CNN", "MLP", "MODELS", "count_params", "create_model"]
