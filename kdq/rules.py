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


class PathRules:
    """Compiled (regex, value) rules: the one path lookup of kdq.

    Every selection by path (weights, activations, feature taps, pruning,
    sharding, reports) goes through `PathRules.lookup`: the regexes are tried
    in order with `re.fullmatch`, and the first that matches wins.

    Args:
      rules: a sequence of (regex, value) pairs; value is a `value_type` or None.
      value_type: the type(s) a rule's value may have besides None.
      name: the argument name used in error messages.

    Raises:
      ValueError: `rules` is not a sequence of pairs, a value has the wrong
        type, or a regex does not compile; the message names `name[i]`.

    >>> rules = PathRules([("head/.*", None), (".*/kernel", 4)], int)
    >>> rules.lookup("Dense_0/kernel"), rules.lookup("head/kernel"), rules.lookup("x/bias")
    ((1, 4), (0, None), (None, None))
    """

    def __init__(self, rules: Rules, value_type: type | tuple[type, ...], *, name: str = "rules"):
        if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
            raise ValueError(f"{name} must be a list of (regex, value) pairs, got {name}={rules!r}")
        self.name = name
        self._compiled: list[tuple[re.Pattern, Any]] = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, Sequence) or isinstance(rule, str) or len(rule) != 2:
                raise ValueError(f"{name}[{i}] must be a (regex, value) pair, got {rule!r}")
            pattern, value = rule
            if value is not None and not isinstance(value, value_type):
                raise ValueError(
                    f"{name}[{i}] value must be {value_type} or None, got "
                    f"{type(value).__name__}: {value!r}"
                )
            try:
                self._compiled.append((re.compile(pattern), value))
            except (re.error, TypeError) as e:
                raise ValueError(f"{name}[{i}] regex {pattern!r} is invalid: {e}") from None

    def __len__(self) -> int:
        return len(self._compiled)

    def __iter__(self):
        """The (compiled regex, value) pairs, in order."""
        return iter(self._compiled)

    @property
    def patterns(self) -> list[str]:
        """The regexes as written."""
        return [regex.pattern for regex, _ in self._compiled]

    def lookup(self, path: str) -> tuple[int | None, Any]:
        """(index, value) of the first rule whose regex fully matches `path`; (None, None) if none."""
        for index, (regex, value) in enumerate(self._compiled):
            if regex.fullmatch(path):
                return index, value
        return None, None

    def matching(self, path: str) -> list[int]:
        """Indices of every rule whose regex fully matches `path`, in order.

        For selections where each rule stands alone (a feature tap per rule)
        rather than the first match winning.
        """
        return [index for index, (regex, _) in enumerate(self._compiled) if regex.fullmatch(path)]

    def value(self, path: str) -> Any:
        """The value of the first rule matching `path`, or None (no rule, or a None rule)."""
        return self.lookup(path)[1]


def compile_rules(
    rules: Rules, value_type: type | tuple[type, ...], *, name: str = "rules"
) -> PathRules:
    """Validates `rules` and compiles their regexes.

    Args:
      rules: (regex, value) pairs.
      value_type: the type(s) a rule's value may have besides None.
      name: the argument name used in error messages.

    Returns:
      The `PathRules`.
    """
    return PathRules(rules, value_type, name=name)


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
    compiled = PathRules(rules, value_type, name=name)
    values, matched_any = [], False
    for path in paths:
        index, value = compiled.lookup(path)
        matched_any = matched_any or index is not None
        values.append(value)
    if compiled and not matched_any:
        shown = "\n  ".join(paths[:50])
        more = f"\n  ... and {len(paths) - 50} more" if len(paths) > 50 else ""
        raise ValueError(
            f"{name} {compiled.patterns} match no leaf (regexes must match a "
            f"whole path, e.g. '.*/kernel'); available paths:\n  {shown}{more}"
        )
    return values
