"""Feature taps: intermediate activations of any Linen model, selected by path.

A tap is a regex matched against the whole '/'-joined path of a submodule
(`kdq.rules.PathRules`, as every path selection in kdq), e.g. "Conv_1" or
"layer3/.*block_2"; each tap is matched on its own. The tapped feature is the
output of that submodule's `__call__`, captured with Linen's
`capture_intermediates`: the model's code is not edited.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from kdq.rules import PathRules, key_path_str


def _module_path(module: nn.Module) -> str:
    return "/".join(module.path)


def module_paths(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> list[str]:
    """Paths of every submodule `__call__` of `model` on the given inputs (no compute).

    Args:
      model: any Linen module.
      variables: its variables.
      *args, **kwargs: the model's inputs, as for `model.apply`.

    Returns:
      '/'-joined module paths, in call order, each once.
    """

    def run(variables, *args):
        return model.apply(
            variables, *args, capture_intermediates=True, mutable=["intermediates"], **kwargs
        )[1]

    shapes = jax.eval_shape(run, variables, *args)
    leaves, _ = jax.tree_util.tree_flatten_with_path(shapes["intermediates"])
    paths = []
    for path, _ in leaves:
        name = key_path_str(path).rsplit("/__call__", 1)[0]
        if not name.startswith("__call__") and name not in paths:
            paths.append(name)
    return paths


def apply_with_taps(
    model: nn.Module,
    variables: Any,
    *args: Any,
    taps: Sequence[str] = (),
    mutable: Sequence[str] | bool = False,
    **kwargs: Any,
) -> tuple[Any, dict[str, jax.Array], Any]:
    """Runs `model.apply` and returns the outputs of the tapped submodules.

    Args:
      model: any Linen module.
      variables: its variables, e.g. {"params": ...}.
      *args: the model's positional inputs.
      taps: regexes, each matching exactly one submodule path.
      mutable: variable collections to update (e.g. ["batch_stats"]).
      **kwargs: the model's keyword inputs (e.g. train=True).

    Returns:
      (output, features, updates): the model output, {tap: feature array},
      and the updated mutable collections (an empty dict when none).

    Raises:
      ValueError: a tap is not a valid regex, or matches no submodule or
        several; the message lists the model's submodule paths.
    """
    rules = PathRules([(tap, None) for tap in taps], object, name="taps")
    captured: dict[str, list[str]] = {tap: [] for tap in taps}

    def select(module: nn.Module, method_name: str) -> bool:
        if method_name != "__call__":
            return False
        path = _module_path(module)
        hits = rules.matching(path) if path else []
        for index in hits:
            if path not in captured[taps[index]]:
                captured[taps[index]].append(path)
        return bool(hits)

    extra_mutable = list(mutable) if isinstance(mutable, Sequence) else []
    if not taps:
        result = model.apply(variables, *args, mutable=mutable or False, **kwargs)
        output, updates = result if mutable else (result, {})
        return output, {}, updates
    output, state = model.apply(
        variables,
        *args,
        capture_intermediates=select,
        mutable=["intermediates", *extra_mutable],
        **kwargs,
    )
    state = dict(state)
    intermediates = state.pop("intermediates", {})
    features = {}
    for tap in taps:
        if len(captured[tap]) != 1:
            available = module_paths(model, variables, *args, **kwargs)
            found = "nothing" if not captured[tap] else f"{sorted(captured[tap])}"
            raise ValueError(
                f"feature tap {tap!r} must match exactly one submodule, matched {found}; "
                f"submodule paths of {type(model).__name__}: {available}"
            )
        node = intermediates
        for part in captured[tap][0].split("/"):
            node = node[part]
        features[tap] = node["__call__"][0]
    return output, features, state
