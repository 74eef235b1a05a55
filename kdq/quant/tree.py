"""Quantization of whole param pytrees by path rules (see `kdq.rules`)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from kdq.quant.numerics import dequantize, fake_quant, quantize
from kdq.quant.qarray import QArray
from kdq.quant.spec import QuantSpec
from kdq.rules import Rules, key_path_str, match_rules


def tree_specs(params: Any, rules: Rules) -> Any:
    """The `QuantSpec` (or None) each leaf of `params` gets from `rules`.

    Args:
      params: a pytree of arrays (e.g. Linen `params`).
      rules: (regex, QuantSpec | None) pairs, first full match wins.

    Returns:
      A list of (path, spec or None), one per leaf in flattening order.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [key_path_str(path) for path, _ in leaves]
    specs = match_rules(paths, rules, QuantSpec)
    for path, (_, leaf), spec in zip(paths, leaves, specs, strict=True):
        if spec is not None and not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            raise ValueError(
                f"rules select '{path}' for quantization, but it has dtype "
                f"{jnp.asarray(leaf).dtype}; only floating-point leaves can be quantized"
            )
    return list(zip(paths, specs, strict=True))


def _map_selected(fn, params: Any, rules: Rules, key: jax.Array | None) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = tree_specs(params, rules)
    out = []
    for i, (leaf, (_, spec)) in enumerate(zip(leaves, specs, strict=True)):
        if spec is None:
            out.append(leaf)
        else:
            leaf_key = None if key is None else jax.random.fold_in(key, i)
            out.append(fn(leaf, spec, key=leaf_key))
    return jax.tree_util.tree_unflatten(treedef, out)


def fake_quant_tree(params: Any, rules: Rules, *, key: jax.Array | None = None) -> Any:
    """Fake-quantizes the leaves selected by `rules` (STE gradient); others unchanged.

    Args:
      params: pytree of float arrays.
      rules: (regex, QuantSpec | None) pairs matched against leaf paths.
      key: PRNG key for stochastic rounding (folded with each leaf's index).

    Returns:
      A pytree of the same structure and dtypes.
    """
    return _map_selected(fake_quant, params, rules, key)


def quantize_tree(params: Any, rules: Rules, *, key: jax.Array | None = None) -> Any:
    """Replaces each leaf selected by `rules` with its `QArray`.

    Args:
      params: any pytree of float arrays.
      rules: (regex, QuantSpec | None) over '/'-joined leaf paths.
      key: PRNG key for rules with rounding="stochastic" (as `fake_quant_tree`).

    Returns:
      The pytree with `QArray` leaves where a spec matched, arrays elsewhere.
    """
    return _map_selected(quantize, params, rules, key)


def states_by_path(state: Any) -> dict[str, dict[str, Any]]:
    """Quantizer state nested by path, as {path: {field: leaf}}.

    The last key of each leaf is its field, the keys before it the
    '/'-joined path of the weight or module the state belongs to.

    >>> states_by_path({"block": {"Dense_0": {"scale": 1.0, "zero_point": 0}}})
    {'block/Dense_0': {'scale': 1.0, 'zero_point': 0}}
    """
    by_path: dict[str, dict[str, Any]] = {}
    for key, value in flax.traverse_util.flatten_dict(state or {}, sep="/").items():
        path, _, field = key.rpartition("/")
        by_path.setdefault(path, {})[field] = value
    return by_path


def dequantize_tree(tree: Any) -> Any:
    """Replaces every `QArray` in `tree` by its dequantized float32 array.

    Args:
      tree: a pytree whose leaves are arrays and/or `QArray`s.

    Returns:
      The same structure with plain float32 arrays where `QArray`s were.
    """
    return jax.tree_util.tree_map(
        lambda x: dequantize(x) if isinstance(x, QArray) else x,
        tree,
        is_leaf=lambda x: isinstance(x, QArray),
    )
