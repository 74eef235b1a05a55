"""Path rules: '/'-joined key paths, first full match wins, validation."""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import numpy as np
import pytest
from flax import struct

from kdq.quant import QuantSpec
from kdq.rules import PathRules, compile_rules, key_path_str, match_rules, tree_paths


class Pair(NamedTuple):
    first: object
    second: object


@struct.dataclass
class Holder:
    weight: object
    meta: str = struct.field(pytree_node=False, default="m")


class Opaque:
    """A pytree registered without keys: its children get flattened-index keys."""

    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(
    Opaque, lambda o: ((o.a, o.b), None), lambda _, children: Opaque(*children)
)


def test_paths_join_dict_keys_indices_and_attributes():
    tree = {
        "params": {"Dense_0": {"kernel": 1, "bias": 2}},
        "layers": [3, {"w": 4}],
        "pair": Pair(5, 6),
        "holder": Holder(weight=7),
        "opaque": Opaque(8, 9),
        "ints": {0: 10, 1: 11},
    }
    assert tree_paths(tree) == [
        "holder/weight",
        "ints/0",
        "ints/1",
        "layers/0",
        "layers/1/w",
        "opaque/0",
        "opaque/1",
        "pair/first",
        "pair/second",
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
    ]


def test_key_path_str_of_each_key_kind():
    assert key_path_str(()) == ""
    assert key_path_str((jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(3))) == "a/3"
    assert key_path_str((jax.tree_util.GetAttrKey("w"),)) == "w"
    assert key_path_str((jax.tree_util.FlattenedIndexKey(2),)) == "2"


def test_tree_paths_is_leaf():
    tree = {"a": (1, 2), "b": 3}
    assert tree_paths(tree, is_leaf=lambda x: isinstance(x, tuple)) == ["a", "b"]


PATHS = ["params/Dense_0/kernel", "params/Dense_0/bias", "params/Dense_1/kernel", "step"]


def test_first_full_match_wins():
    a, b = QuantSpec(bits=4), QuantSpec(bits=8)
    rules = [(r"params/Dense_1/.*", None), (r".*/kernel", a), (r".*", b)]
    assert match_rules(PATHS, rules, QuantSpec) == [a, b, None, b]
    reordered = [(r".*/kernel", a), (r"params/Dense_1/.*", None), (r".*", b)]
    assert match_rules(PATHS, reordered, QuantSpec) == [a, b, a, b]


def test_match_is_full_not_search():
    a = QuantSpec()
    # "kernel" is in the path but does not match the whole path
    assert match_rules(PATHS, [(r"kernel", a), (r"step", a)], QuantSpec) == [None, None, None, a]
    assert (
        match_rules(PATHS, [(r"params/Dense_0", a), (r"ste", None), (r"step", a)], QuantSpec)[3]
        is a
    )
    assert match_rules(["ab"], [(r"a|ab", a)], QuantSpec) == [a]


def test_no_rules_select_nothing():
    assert match_rules(PATHS, [], QuantSpec) == [None] * 4


def test_rules_may_match_only_with_none():
    assert match_rules(PATHS, [(r"step", None)], QuantSpec) == [None] * 4


def test_rules_matching_nothing_list_the_paths():
    with pytest.raises(ValueError, match=r"rules \['kernel'\] match no leaf") as info:
        match_rules(PATHS, [(r"kernel", QuantSpec())], QuantSpec)
    message = str(info.value)
    assert "available paths" in message
    for path in PATHS:
        assert path in message


def test_many_paths_are_truncated_in_the_message():
    paths = [f"layer_{i}/w" for i in range(60)]
    with pytest.raises(ValueError, match=r"layer_49/w\n  \.\.\. and 10 more") as info:
        match_rules(paths, [(r"nothing", None)], QuantSpec)
    assert "layer_50/w" not in str(info.value)


@pytest.mark.parametrize("pattern", ["(", "[a-", "*kernel", "a{2,1}"])
def test_invalid_regex(pattern):
    with pytest.raises(ValueError, match=r"rules\[1\] regex " + re.escape(repr(pattern))):
        compile_rules([(r".*", None), (pattern, QuantSpec())], QuantSpec)


def test_non_string_regex():
    with pytest.raises(ValueError, match=r"rules\[0\] regex 3 is invalid"):
        compile_rules([(3, None)], QuantSpec)


@pytest.mark.parametrize("value", [4, "int4", {"bits": 4}, QuantSpec])
def test_rule_value_that_is_not_a_quant_spec(value):
    pattern = r"rules\[0\] value must be .*QuantSpec.* or None, got " + re.escape(
        f"{type(value).__name__}: {value!r}"
    )
    with pytest.raises(ValueError, match=pattern):
        match_rules(PATHS, [(r".*", value)], QuantSpec)


@pytest.mark.parametrize("rules", ["params/.*", b".*", None, 3, {".*": None}])
def test_rules_must_be_a_list_of_pairs(rules):
    with pytest.raises(ValueError, match=r"rules must be a list of \(regex, value\) pairs"):
        compile_rules(rules, QuantSpec)


@pytest.mark.parametrize("rule", [(".*",), (".*", None, None), ".*", "ab"])
def test_rule_must_be_a_pair(rule):
    with pytest.raises(ValueError, match=r"rules\[0\] must be a \(regex, value\) pair"):
        compile_rules([rule], QuantSpec)


def test_error_messages_use_the_argument_name():
    with pytest.raises(ValueError, match=r"prune_rules\[0\] value must be"):
        compile_rules([(".*", 1.5)], QuantSpec, name="prune_rules")
    with pytest.raises(ValueError, match=r"prune_rules \['x'\] match no leaf"):
        match_rules(["a"], [("x", None)], QuantSpec, name="prune_rules")


def test_value_type_tuple_and_compiled_patterns():
    compiled = compile_rules([(r".*", 0.5), (r"a", 3)], (int, float))
    assert [(p.pattern, v) for p, v in compiled] == [(".*", 0.5), ("a", 3)]
    assert all(isinstance(p, re.Pattern) for p, _ in compiled)
    assert match_rules(["x", "a"], [(r"a", 3), (r".*", None)], (int, float)) == [None, 3]
    assert match_rules(["w"], [(r"w", np.float32(1))], np.floating) == [np.float32(1)]


def test_path_rules_lookup_matches_a_hand_written_table():
    rules = PathRules(
        [(r"params/head/.*", None), (r".*/kernel", 4), (r"params/Conv_\d+/.*", 8)], int
    )
    expected = {
        "params/Conv_0/kernel": (1, 4),  # rules 1 and 2 match: the first wins
        "params/Conv_12/bias": (2, 8),
        "params/head/kernel": (0, None),  # a None rule still matches
        "params/Dense_0/bias": (None, None),
        "kernel": (None, None),  # ".*/kernel" needs a '/' before "kernel"
        "params/Conv_0": (None, None),  # full matches only, no prefix match
        "xparams/head/kernel": (1, 4),  # ... and no search inside the path
    }
    assert {path: rules.lookup(path) for path in expected} == expected
    assert {path: rules.value(path) for path in expected} == {
        path: value for path, (_, value) in expected.items()
    }
    assert rules.matching("params/Conv_0/kernel") == [1, 2]
    assert rules.matching("params/head/kernel") == [0, 1]
    assert rules.matching("params/Dense_0/bias") == []
    assert len(rules) == 3
    assert rules.patterns == [r"params/head/.*", r".*/kernel", r"params/Conv_\d+/.*"]
    assert isinstance(compile_rules([(r".*", 1)], int), PathRules)
    assert len(PathRules([], int)) == 0 and PathRules([], int).lookup("a") == (None, None)
