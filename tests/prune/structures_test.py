"""Pruning whole attention heads and MLP neurons (row groups of a kernel) against numpy."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from kdq.prune import (
    PruneSpec,
    Pruning,
    apply_masks,
    magnitude_mask,
    masked_pruning,
    masks_from_state,
    one_shot_schedule,
    polynomial_schedule,
    sparsity_of,
    tree_masks,
)

from . import reference as ref

HEADS, HEAD_DIM, D_MODEL, MLP_DIM = 6, 4, 8, 12


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def row_group_mask(w, group_size, sparsity, norm="l2", grad=None):
    """Loops over the groups of `group_size` rows of axis -2; prunes floor(s * G) of lowest norm."""
    importance = ref.importance(w, grad)
    num_groups = w.shape[-2] // group_size
    blocks = [importance[..., g * group_size : (g + 1) * group_size, :] for g in range(num_groups)]
    scores = np.array([b.sum() if norm == "l1" else np.sqrt((b**2).sum()) for b in blocks])
    keep = ref.prune_lowest(scores, int(np.floor(sparsity * num_groups + 1e-9)))
    mask = np.zeros(w.shape, bool)
    for g in range(num_groups):
        mask[..., g * group_size : (g + 1) * group_size, :] = keep[g]
    return mask


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _head_outputs(x, wq, wk, wv):
    """Causal attention of each head on its own: (H, T, Dh), float64."""
    t = x.shape[0]
    causal = np.tril(np.ones((t, t), bool))
    outputs = []
    for h in range(HEADS):
        cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        q, k, v = x @ wq[:, cols], x @ wk[:, cols], x @ wv[:, cols]
        scores = np.where(causal, q @ k.T / np.sqrt(HEAD_DIM), -np.inf)
        outputs.append(_softmax(scores) @ v)
    return np.stack(outputs)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.9])
def test_heads_prune_floor_s_h_whole_head_blocks_of_lowest_norm(norm, sparsity):
    wo = _normal(0, (HEADS * HEAD_DIM, D_MODEL))
    spec = PruneSpec(sparsity=sparsity, structure="heads", group_size=HEAD_DIM, norm=norm)
    mask = np.asarray(magnitude_mask(wo, spec))
    np.testing.assert_array_equal(mask, row_group_mask(wo, HEAD_DIM, sparsity, norm))
    heads = mask.reshape(HEADS, HEAD_DIM * D_MODEL)
    assert np.all(heads.all(axis=1) | ~heads.any(axis=1)), "a head is partly pruned"
    assert np.sum(~heads.all(axis=1)) == int(np.floor(sparsity * HEADS))


def test_heads_round_down_and_ignore_float_rounding():
    # 0.3 * 6 = 1.8 heads: one is pruned, never more than the target fraction.
    wo = _normal(1, (HEADS * HEAD_DIM, D_MODEL))
    mask = magnitude_mask(wo, PruneSpec(sparsity=0.3, structure="heads", group_size=HEAD_DIM))
    assert np.sum(~np.asarray(mask)) == 1 * HEAD_DIM * D_MODEL
    # 0.57 * 100 is 56.99999999999999 in float64: 57 neurons are meant and pruned,
    # whether the sparsity is a python float or traced (float32).
    down = _normal(2, (100, 3))
    spec = PruneSpec(structure="neurons")
    traced = jax.jit(lambda w, s: magnitude_mask(w, spec, sparsity=s))
    for s in (0.57, 0.29, 0.7, 0.123):
        want = row_group_mask(down, 1, s)
        assert np.sum(~want.all(axis=1)) == {0.57: 57, 0.29: 29, 0.7: 70, 0.123: 12}[s]
        np.testing.assert_array_equal(magnitude_mask(down, spec, sparsity=s), want)
        np.testing.assert_array_equal(traced(down, s), want)


@pytest.mark.parametrize("shape,group_size", [((12, 5), 1), ((12, 5), 3), ((2, 8, 3), 2)])
def test_neurons_and_groups_over_leading_axes_match_reference(shape, group_size):
    w = _normal(3, shape)
    spec = PruneSpec(sparsity=0.5, structure="neurons", group_size=group_size, norm="l1")
    np.testing.assert_array_equal(magnitude_mask(w, spec), row_group_mask(w, group_size, 0.5, "l1"))


def test_neurons_default_to_one_row_per_group():
    assert PruneSpec(structure="neurons").group_size == 1
    # Row norms (l2): 5, 1, 3, 2 -> the two smallest rows, 1 and 3, are pruned.
    down = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 3.0], [0.0, -2.0]], np.float32)
    mask = magnitude_mask(down, PruneSpec(sparsity=0.5, structure="neurons"))
    np.testing.assert_array_equal(
        mask, [[True, True], [False, False], [True, True], [False, False]]
    )


def test_heads_taylor_importance_matches_reference():
    wo = _normal(4, (HEADS * HEAD_DIM, D_MODEL))
    # The three heads of largest weights get tiny gradients: Taylor prunes them,
    # magnitude the three others.
    norms = np.linalg.norm(wo.reshape(HEADS, -1), axis=1)
    head_scale = np.where(np.argsort(np.argsort(norms)) >= HEADS // 2, 1e-3, 1.0)
    grad = _normal(5, wo.shape) * np.repeat(head_scale, HEAD_DIM)[:, None].astype(np.float32)
    spec = PruneSpec(sparsity=0.5, structure="heads", group_size=HEAD_DIM, importance="taylor")
    mask = np.asarray(magnitude_mask(wo, spec, grad=grad))
    np.testing.assert_array_equal(mask, row_group_mask(wo, HEAD_DIM, 0.5, grad=grad))
    np.testing.assert_array_equal(mask, ~row_group_mask(wo, HEAD_DIM, 0.5))


def test_zeroing_head_rows_of_o_removes_exactly_those_heads():
    x = _normal(6, (5, D_MODEL)).astype(np.float64)
    wq, wk, wv = (_normal(s, (D_MODEL, HEADS * HEAD_DIM)) for s in (7, 8, 9))
    wo = _normal(10, (HEADS * HEAD_DIM, D_MODEL))
    spec = PruneSpec(sparsity=0.5, structure="heads", group_size=HEAD_DIM)
    pruned_wo = np.asarray(apply_masks(wo, magnitude_mask(wo, spec)), np.float64)
    heads = _head_outputs(x, wq, wk, wv)
    # Multi-head attention as the model computes it: concat(heads) @ W_o.
    concat = np.concatenate(list(heads), axis=-1)
    kept = [h for h in range(HEADS) if np.any(pruned_wo[h * HEAD_DIM : (h + 1) * HEAD_DIM])]
    assert len(kept) == HEADS - 3
    # ... and attention built from the kept heads only, each with its own rows of W_o.
    without = sum(heads[h] @ wo[h * HEAD_DIM : (h + 1) * HEAD_DIM] for h in kept)
    np.testing.assert_allclose(concat @ pruned_wo, without, rtol=1e-12, atol=1e-12)
    assert not np.allclose(concat @ wo, without), "the pruned heads should have mattered"


def test_zeroing_rows_of_down_removes_exactly_those_neurons():
    x = _normal(11, (4, D_MODEL)).astype(np.float64)
    gate, up = _normal(12, (D_MODEL, MLP_DIM)), _normal(13, (D_MODEL, MLP_DIM))
    down = _normal(14, (MLP_DIM, D_MODEL))
    mask = np.asarray(magnitude_mask(down, PruneSpec(sparsity=0.25, structure="neurons")))
    kept = np.flatnonzero(mask.all(axis=1))
    assert kept.size == MLP_DIM - 3

    def swiglu(gate, up, down):
        g = x @ gate
        return (g / (1 + np.exp(-g)) * (x @ up)) @ down

    pruned = swiglu(gate, up, np.where(mask, down, 0.0))
    np.testing.assert_allclose(
        pruned, swiglu(gate[:, kept], up[:, kept], down[kept]), rtol=1e-12, atol=1e-12
    )
    assert not np.allclose(pruned, swiglu(gate, up, down))


def _two_blocks():
    """Two attention output kernels, block_1's weights 3x larger, and MLP down kernels."""
    return {
        f"block_{i}": {
            "attn": {"o": {"kernel": _normal(20 + i, (HEADS * HEAD_DIM, D_MODEL)) * (1 + 2 * i)}},
            "mlp": {"down": {"kernel": _normal(30 + i, (MLP_DIM, D_MODEL))}},
        }
        for i in range(2)
    }


def test_global_scope_ranks_heads_of_all_layers_together():
    params = _two_blocks()
    rules = [
        (r".*/attn/o/kernel", PruneSpec(sparsity=0.5, structure="heads", group_size=HEAD_DIM)),
        (r".*/mlp/down/kernel", PruneSpec(sparsity=0.5)),
    ]
    masks = jax.jit(lambda p: tree_masks(p, rules, scope="global"))(params)
    # Reference: the heads of both layers in one list, floor(0.5 * 12) = 6 pruned.
    both = np.concatenate([params[f"block_{i}"]["attn"]["o"]["kernel"] for i in range(2)])
    want = row_group_mask(both, HEAD_DIM, 0.5)
    got = np.concatenate([masks[f"block_{i}"]["attn"]["o"]["kernel"] for i in range(2)])
    np.testing.assert_array_equal(got, want)
    pruned_0 = np.sum(~masks["block_0"]["attn"]["o"]["kernel"].all(axis=1)) // HEAD_DIM
    assert pruned_0 > HEADS // 2, "the smaller layer should lose more heads"
    # The unstructured leaves form a pool of their own.
    downs = [params[f"block_{i}"]["mlp"]["down"]["kernel"] for i in range(2)]
    for i, want in enumerate(ref.global_masks(downs, 0.5)):
        np.testing.assert_array_equal(masks[f"block_{i}"]["mlp"]["down"]["kernel"], want)
    layer = tree_masks(params, rules, scope="layer")
    for i in range(2):
        kernel = params[f"block_{i}"]["attn"]["o"]["kernel"]
        np.testing.assert_array_equal(
            layer[f"block_{i}"]["attn"]["o"]["kernel"], row_group_mask(kernel, HEAD_DIM, 0.5)
        )


def test_masked_pruning_follows_the_polynomial_schedule_on_heads_and_neurons():
    schedule = polynomial_schedule(initial=0.0, final=0.75, begin=2, end=8, frequency=2)
    specs = {
        "attn/o": PruneSpec(structure="heads", group_size=HEAD_DIM),
        "mlp/down": PruneSpec(structure="neurons", norm="l1"),
    }
    tx = masked_pruning(schedule, [(f".*/{name}/kernel", spec) for name, spec in specs.items()])
    params = _two_blocks()
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(40)
    for step in range(10):
        noise = jax.tree.map(lambda w: 0.1 * rng.standard_normal(w.shape, np.float32), params)
        before = params
        updates, state = update(noise, state, params)
        params = optax.apply_updates(params, updates)
        s = ref.polynomial(step, 0.0, 0.75, 2, 8, 2)
        masks = masks_from_state(state)
        for i in range(2):
            for name, spec in specs.items():
                layer, module = name.split("/")
                w_before = before[f"block_{i}"][layer][module]["kernel"]
                mask = np.asarray(masks[f"block_{i}"][layer][module]["kernel"])
                if step >= 2 and step % 2 == 0:
                    want = row_group_mask(w_before, spec.group_size, s, spec.norm)
                    np.testing.assert_array_equal(mask, want, err_msg=f"step {step} {name}")
                w = np.asarray(params[f"block_{i}"][layer][module]["kernel"])
                assert np.all(w[~mask] == 0)
    report = sparsity_of(params)
    assert report.per_layer["block_0/attn/o/kernel"] == np.floor(0.75 * HEADS) / HEADS
    assert report.per_layer["block_1/mlp/down/kernel"] == np.floor(0.75 * MLP_DIM) / MLP_DIM


def test_pruning_one_shot_heads_reaches_its_sparsity():
    pruning = Pruning(
        one_shot_schedule(0.5, begin=0),
        ((r"params/.*/attn/o/kernel", PruneSpec(structure="heads", group_size=HEAD_DIM)),),
    )
    tx = pruning.transform()
    params = _two_blocks()
    trainable = {"params": params}
    updates, _ = tx.update(jax.tree.map(np.zeros_like, trainable), tx.init(trainable), trainable)
    pruned = optax.apply_updates(trainable, updates)["params"]
    assert pruning.sparsity(pruned) == 0.5
    kernel = params["block_1"]["attn"]["o"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(pruned["block_1"]["attn"]["o"]["kernel"]) != 0,
        row_group_mask(kernel, HEAD_DIM, 0.5),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"structure": "heads"}, r"structure 'heads' needs group_size >= 1 .*head_dim.*=None"),
        ({"structure": "neurons", "group_size": 0}, r"needs group_size >= 1 .*got group_size=0"),
        ({"structure": "heads", "group_size": True}, r"got group_size=True"),
        ({"structure": "channel", "group_size": 4}, r"group_size is for structures .*'channel'"),
    ],
)
def test_bad_group_specs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneSpec(**kwargs)


def test_bad_group_inputs_are_rejected():
    spec = PruneSpec(sparsity=0.5, structure="heads", group_size=5)
    with pytest.raises(
        ValueError,
        match=r"group_size=5 must divide the contraction axis \(axis -2\) of w, shape \(24, 8\)",
    ):
        magnitude_mask(np.ones((24, 8), np.float32), spec)
    with pytest.raises(ValueError, match=r"structure 'neurons' needs a kernel with at least 2"):
        magnitude_mask(np.ones(6), PruneSpec(sparsity=0.5, structure="neurons"))
    params = _two_blocks()
    mixed = [
        ("block_0/attn/o/kernel", PruneSpec(sparsity=0.5, structure="heads", group_size=4)),
        (
            "block_1/attn/o/kernel",
            PruneSpec(sparsity=0.5, structure="heads", group_size=4, norm="l1"),
        ),
    ]
    with pytest.raises(ValueError, match=r"needs one norm shared by all heads specs.*: l1"):
        tree_masks(params, mixed, scope="global")
    with pytest.raises(ValueError, match=r"group_size=5 must divide .*'block_0/attn/o/kernel'"):
        tree_masks(params, [(".*/o/kernel", spec)], scope="global")
