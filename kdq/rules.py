"""Rules by path: `(regex, value)` pairs matched against '/'-joined key paths.

The same mechanism selects what gets quantized, pruned or sharded. A leaf's
path joins its dict keys, sequence indices and attribute names with '/', e.g.
`params/Dense_0/kernel`. Each regex is matched with `re.fullmatch`, in order;
the first match wins; a value of None means "leave this leaf alone".

    rules = [(r".*/bias", None), (r".*/kernel", QuantSpec(bits=4, axes=(-1,)))]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

Rules = Sequence[tuple[str, Any]]


def key_path_str(key_path: tuple[Any, ...]) -> str:
    """'/'-joined path of a `jax.tree_util` key path.

    Args:
      key_path: a key path from `jax.tree_util.tree_flatten_with_path`.

    Returns:
      The path, e.g. 'params/Dense_0/kernel'.

    >>> import jax
    >>> [key_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, {"b": 2}]})[0]]
    ['a/0', 'a/1/b']
    """
    parts = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def tree_paths(tree: Any, *, is_leaf=None) -> list[str]:
    """The '/'-joined paths of every leaf of `tree`, in flattening order.

    Args:
      tree: any pytree.
      is_leaf: as for `jax.tree_util.tree_flatten_with_path`.

    Returns:
      One path per leaf.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [key_path_str(path) for path, _ in leaves]


def compile_rules(rules: Rules, value_type: type | tuple[type, ...], *, name: str = "rules"):
    """Validates `rules` and compiles their regexes.

    Args:
      rules: a sequence of (regex, value) pairs; value is a `value_type` or None.
      value_type: the type(s) a rule's value may have besides None.
      name: the argument name used in error messages.

    Returns:
      A list of (compiled regex, value).
    """
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise ValueError(f"{name} must be a list of (regex, value) pairs, got {name}={rules!r}")
    compiled = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, Sequence) or isinstance(rule, str) or len(rule) != 2:
            raise ValueError(f"{name}[{i}] must be a (regex, value) pair, got {rule!r}")
        pattern, value = rule
        if value is not None and not isinstance(value, value_type):
            raise ValueError(
                f"{name}[{i}] value must be {value_type} or None, got {type(value).__name__}: "
                f"{value!r}"
            )
        try:
            compiled.append((re.compile(pattern), value))
        except (re.error, TypeError) as e:
            raise ValueError(f"{name}[{i}] regex {pattern!r} is invalid: {e}") from None
    return compiled


def match_rules(paths: Sequence[str], rules: Rules, value_type, *, name: str = "rules") -> list:
    """For each path, the value of the first rule whose regex fully matches it.

    Args:
      paths: leaf paths, e.g. from `tree_paths`.
      rules: (regex, value) pairs; see the module docstring.
      value_type: the type(s) a rule's value may have besides None.
      name: the argument name used in error messages.

    Returns:
      A list aligned with `paths`: the matched value, or None (no rule matched,
      or the matching rule's value is None).

    Raises:
      ValueError: if `rules` is not empty and no rule matches any path; the
        message lists the paths. (An empty rule list selects nothing.)

    >>> match_rules(["Dense_0/kernel", "Dense_0/bias", "head/kernel"],
    ...             [("head/.*", None), (".*/kernel", 4)], int)
    [4, None, None]
    """
    compiled = compile_rules(rules, value_type, name=name)
    values, matched_any = [], False
    for path in paths:
        value = None
        for regex, rule_value in compiled:
            if regex.fullmatch(path):
                value, matched_any = rule_value, True
                break
        values.append(value)
    if compiled and not matched_any:
        shown = "\n  ".join(paths[:50])
        more = f"\n  ... and {len(paths) - 50} more" if len(paths) > 50 else ""
        raise ValueError(
            f"{name} {[p.pattern for p, _ in compiled]} match no leaf (regexes must match a "
            f"whole path, e.g. '.*/kernel'); available paths:\n  {shown}{more}"
        )
    return values
