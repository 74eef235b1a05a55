"""kdq.prune masks against the independent numpy references in `reference.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdq.prune import (
    PruneSpec,
    apply_masks,
    magnitude_mask,
    sparsity_of,
    tree_masks,
)

from . import reference as ref

SHAPES = [(7,), (10, 6), (3, 3, 4, 5), (1, 1)]
SPARSITIES = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _small_ints(seed, shape):
    """Weights with many ties: integers in [-3, 3]."""
    return np.random.default_rng(seed).integers(-3, 4, shape).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_unstructured_prunes_exactly_round_s_n_smallest(shape, sparsity):
    w = _normal(0, shape)
    mask = np.asarray(magnitude_mask(w, PruneSpec(sparsity=sparsity)))
    assert mask.shape == shape and mask.dtype == np.bool_
    assert np.sum(~mask) == round(sparsity * w.size)
    np.testing.assert_array_equal(mask, ref.unstructured_mask(w, sparsity))


# Every new shape compiles the masking ops: shapes are kept small and few.
@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    sparsity=st.floats(0.0, 1.0, exclude_max=True),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_unstructured_random_shapes_and_ties(shape, sparsity, seed, ties):
    w = (_small_ints if ties else _normal)(seed, shape)
    mask = np.asarray(magnitude_mask(w, PruneSpec(sparsity=sparsity)))
    assert np.sum(~mask) == round(sparsity * w.size)
    np.testing.assert_array_equal(mask, ref.unstructured_mask(w, sparsity))


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple),
    sparsity=st.floats(0.0, 1.0, exclude_max=True),
    norm=st.sampled_from(["l1", "l2"]),
    seed=st.integers(0, 2**16),
)
def test_channel_random_shapes(shape, sparsity, norm, seed):
    w = _normal(seed, shape)
    spec = PruneSpec(sparsity=sparsity, structure="channel", norm=norm)
    mask = np.asarray(magnitude_mask(w, spec))
    np.testing.assert_array_equal(mask, ref.channel_mask(w, sparsity, norm))


def test_ties_prune_lower_index_first():
    mask = np.asarray(magnitude_mask(np.ones((2, 3), np.float32), PruneSpec(sparsity=0.5)))
    np.testing.assert_array_equal(mask, [[False, False, False], [True, True, True]])


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("shape", [(6, 8), (3, 3, 4, 10)])
def test_channel_removes_whole_channels_of_smallest_norm(norm, shape):
    w = _normal(1, shape)
    mask = np.asarray(magnitude_mask(w, PruneSpec(sparsity=0.5, structure="channel", norm=norm)))
    flat = mask.reshape(-1, shape[-1])
    assert np.all(flat.all(axis=0) | ~flat.any(axis=0)), "a channel is partly pruned"
    assert np.sum(~flat.all(axis=0)) == round(0.5 * shape[-1])
    np.testing.assert_array_equal(mask, ref.channel_mask(w, 0.5, norm))


def test_channel_l1_and_l2_can_disagree():
    # channel 0: |w| = (3, 0), channel 1: (2, 2): L1 ranks 0 lower, L2 ranks 1 lower.
    w = np.array([[3.0, 2.0], [0.0, 2.0]], np.float32)
    l1 = magnitude_mask(w, PruneSpec(sparsity=0.5, structure="channel", norm="l1"))
    l2 = magnitude_mask(w, PruneSpec(sparsity=0.5, structure="channel", norm="l2"))
    np.testing.assert_array_equal(l1, [[False, True], [False, True]])
    np.testing.assert_array_equal(l2, [[True, False], [True, False]])


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("shape", [(16, 6), (3, 3, 8, 4)])
def test_n_m_keeps_n_largest_in_every_group_along_contraction_axis(n, m, shape):
    w = _normal(2, shape)
    mask = np.asarray(magnitude_mask(w, PruneSpec(structure="n:m", n=n, m=m)))
    groups = np.moveaxis(mask, -2, -1).reshape(-1, m)
    np.testing.assert_array_equal(groups.sum(axis=1), n)
    absw = np.moveaxis(np.abs(w), -2, -1).reshape(-1, m)
    kept_min = np.where(groups, absw, np.inf).min(axis=1)
    pruned_max = np.where(groups, -np.inf, absw).max(axis=1)
    assert np.all(kept_min > pruned_max)
    np.testing.assert_array_equal(mask, ref.nm_mask(w, n, m))
    # Applied to the (nowhere zero) weights, exactly n non-zeros remain per group.
    pruned = np.asarray(apply_masks({"kernel": w}, {"kernel": mask})["kernel"])
    nonzero = np.count_nonzero(np.moveaxis(pruned, -2, -1).reshape(-1, m), axis=1)
    np.testing.assert_array_equal(nonzero, n)


def test_n_m_with_ties_matches_reference():
    w = _small_ints(3, (12, 5))
    mask = np.asarray(magnitude_mask(w, PruneSpec(structure="n:m", n=2, m=4)))
    np.testing.assert_array_equal(mask, ref.nm_mask(w, 2, 4))


@pytest.mark.parametrize(
    "spec",
    [
        PruneSpec(sparsity=0.6, importance="taylor"),
        PruneSpec(sparsity=0.5, structure="channel", norm="l1", importance="taylor"),
        PruneSpec(structure="n:m", n=2, m=4, importance="taylor"),
    ],
    ids=["unstructured", "channel", "n:m"],
)
def test_taylor_importance(spec):
    w, g = _normal(4, (8, 6)), _normal(5, (8, 6))
    mask = np.asarray(magnitude_mask(w, spec, grad=g))
    if spec.structure == "unstructured":
        expected = ref.unstructured_mask(w, spec.sparsity, grad=g)
    elif spec.structure == "channel":
        expected = ref.channel_mask(w, spec.sparsity, spec.norm, grad=g)
    else:
        expected = ref.nm_mask(w, spec.n, spec.m, grad=g)
    np.testing.assert_array_equal(mask, expected)
    magnitude = np.asarray(
        magnitude_mask(w, PruneSpec(**{**vars(spec), "importance": "magnitude"}))
    )
    assert not np.array_equal(mask, magnitude), "taylor should differ from |w| on this data"


def test_traced_sparsity_matches_static():
    w = _normal(6, (9, 7))
    spec = PruneSpec(structure="unstructured")
    traced = jax.jit(lambda w, s: magnitude_mask(w, spec, sparsity=s))
    for s in (0.0, 0.3, 0.8):
        np.testing.assert_array_equal(traced(w, s), ref.unstructured_mask(w, s))


def _two_layer_tree():
    big = np.array([[10.0, -20.0, 30.0], [-40.0, 50.0, 60.0]], np.float32)
    small = np.array([[0.1, -0.6, 0.3], [-0.4, 0.5, 0.2]], np.float32)
    return {"big": {"kernel": big, "bias": np.ones(3, np.float32)}, "small": {"kernel": small}}


def test_global_vs_layer_scope_exact_masks():
    params = _two_layer_tree()
    rules = [(r".*/kernel", PruneSpec(sparsity=0.5))]
    layer = tree_masks(params, rules, scope="layer")
    glob = tree_masks(params, rules, scope="global")
    assert layer["big"]["bias"] is None and glob["big"]["bias"] is None
    # per layer: 3 of 6 in each
    np.testing.assert_array_equal(
        layer["big"]["kernel"], [[False, False, False], [True, True, True]]
    )
    np.testing.assert_array_equal(
        layer["small"]["kernel"], [[False, True, False], [True, True, False]]
    )
    # global: the 6 smallest of 12 are exactly the whole small layer
    np.testing.assert_array_equal(glob["big"]["kernel"], np.ones((2, 3), bool))
    np.testing.assert_array_equal(glob["small"]["kernel"], np.zeros((2, 3), bool))
    leaves = [params["big"]["kernel"], params["small"]["kernel"]]
    for got, want in zip(
        [glob["big"]["kernel"], glob["small"]["kernel"]],
        ref.global_masks(leaves, 0.5),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_global_scope_random_matches_reference():
    params = {"a": {"kernel": _normal(7, (5, 4)) * 3}, "b": {"kernel": _normal(8, (6, 3))}}
    rules = [(r".*/kernel", PruneSpec(sparsity=0.4))]
    masks = jax.jit(lambda p: tree_masks(p, rules, scope="global"))(params)
    expected = ref.global_masks([params["a"]["kernel"], params["b"]["kernel"]], 0.4)
    np.testing.assert_array_equal(masks["a"]["kernel"], expected[0])
    np.testing.assert_array_equal(masks["b"]["kernel"], expected[1])
    assert np.sum(~masks["a"]["kernel"]) + np.sum(~masks["b"]["kernel"]) == round(0.4 * 38)


def test_global_scope_keeps_structured_layers_per_layer():
    params = {"a": {"kernel": _normal(9, (8, 4))}, "b": {"kernel": _normal(10, (8, 4)) * 100}}
    rules = [
        ("a/kernel", PruneSpec(structure="n:m", n=2, m=4)),
        ("b/kernel", PruneSpec(sparsity=0.5)),
    ]
    masks = tree_masks(params, rules, scope="global")
    np.testing.assert_array_equal(masks["a"]["kernel"], ref.nm_mask(params["a"]["kernel"], 2, 4))
    np.testing.assert_array_equal(
        masks["b"]["kernel"], ref.unstructured_mask(params["b"]["kernel"], 0.5)
    )


def test_global_scope_needs_one_sparsity():
    params = _two_layer_tree()
    rules = [("big/kernel", PruneSpec(sparsity=0.5)), ("small/kernel", PruneSpec(sparsity=0.3))]
    with pytest.raises(ValueError, match=r"scope='global' needs one sparsity.*small/kernel: 0.3"):
        tree_masks(params, rules, scope="global")
    tree_masks(params, rules, scope="layer")


def test_tree_masks_taylor_uses_matching_grads():
    params = {"x": {"kernel": _normal(11, (6, 4))}}
    grads = {"x": {"kernel": _normal(12, (6, 4))}}
    rules = [(r".*", PruneSpec(sparsity=0.5, importance="taylor"))]
    masks = tree_masks(params, rules, grads=grads)
    np.testing.assert_array_equal(
        masks["x"]["kernel"],
        ref.unstructured_mask(params["x"]["kernel"], 0.5, grad=grads["x"]["kernel"]),
    )
    with pytest.raises(ValueError, match="importance='taylor' needs the gradient of 'x/kernel'"):
        tree_masks(params, rules)


def test_apply_masks_and_sparsity_of():
    params = _two_layer_tree()
    params["small"]["kernel"][0, 0] = -0.0
    rules = [(r".*/kernel", PruneSpec(sparsity=0.5))]
    masks = tree_masks(params, rules, scope="global")
    pruned = apply_masks(params, masks)
    assert pruned["small"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(pruned["big"]["bias"], params["big"]["bias"])
    np.testing.assert_array_equal(pruned["big"]["kernel"], params["big"]["kernel"])
    zeros = np.asarray(pruned["small"]["kernel"])
    assert np.all(zeros == 0) and not np.any(np.signbit(zeros)), "expected exact +0.0"

    report = sparsity_of(masks)
    assert report.per_layer == {"big/kernel": 0.0, "small/kernel": 1.0}
    assert (report.overall, report.pruned, report.total) == (0.5, 6, 12)
    on_params = sparsity_of(pruned)
    assert on_params.per_layer == {"big/bias": 0.0, "big/kernel": 0.0, "small/kernel": 1.0}
    assert (on_params.pruned, on_params.total) == (6, 15)
    assert sparsity_of(pruned, rules).per_layer == report.per_layer


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), True])
def test_sparsity_outside_unit_interval_is_rejected(sparsity):
    with pytest.raises(
        ValueError, match=rf"sparsity must be a number in \[0, 1\), got sparsity={sparsity!r}"
    ):
        PruneSpec(sparsity=sparsity)
    with pytest.raises(ValueError, match=r"got sparsity="):
        magnitude_mask(np.ones(4), PruneSpec(), sparsity=sparsity)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"structure": "n:m", "n": 5, "m": 4}, r"n must be <= m .*got n=5, m=4"),
        ({"structure": "n:m", "n": 0, "m": 4}, r"needs n >= 1 .*got n=0"),
        ({"structure": "n:m", "n": 2}, r"needs m >= 1 .*got m=None"),
        (
            {"structure": "n:m", "n": 2, "m": 4, "sparsity": 0.5},
            r"leave sparsity=None, got sparsity=0.5",
        ),
        ({"structure": "unstructured", "n": 2, "m": 4}, r"n and m are for structure 'n:m' only"),
        ({"structure": "block"}, r"structure must be one of .*got structure='block'"),
        ({"norm": "linf"}, r"norm must be one of .*got norm='linf'"),
        ({"importance": "hessian"}, r"importance must be one of .*got importance='hessian'"),
    ],
)
def test_bad_spec_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneSpec(**kwargs)


def test_bad_shapes_and_missing_inputs_are_rejected():
    with pytest.raises(
        ValueError,
        match=r"m=4 must divide the contraction axis \(axis -2\) of w, shape \(6, 3\): size 6",
    ):
        magnitude_mask(np.ones((6, 3)), PruneSpec(structure="n:m", n=2, m=4))
    with pytest.raises(
        ValueError, match=r"structure 'channel' needs a kernel with at least 2 axes"
    ):
        magnitude_mask(np.ones(5), PruneSpec(sparsity=0.5, structure="channel"))
    with pytest.raises(
        ValueError, match=r"importance='taylor' needs the gradient of w, got grad=None"
    ):
        magnitude_mask(np.ones((4, 4)), PruneSpec(sparsity=0.5, importance="taylor"))
    with pytest.raises(ValueError, match=r"has sparsity=None"):
        magnitude_mask(np.ones((4, 4)), PruneSpec())
    with pytest.raises(ValueError, match=r"scope must be one of .*got scope='tree'"):
        tree_masks({"k": np.ones(3)}, [("k", PruneSpec(sparsity=0.5))], scope="tree")
    with pytest.raises(ValueError, match=r"only floating-point leaves can be pruned"):
        tree_masks({"k": np.ones(3, np.int32)}, [("k", PruneSpec(sparsity=0.5))])
