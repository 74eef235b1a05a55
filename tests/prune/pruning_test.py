"""kdq.prune.Pruning: the named (schedule, rules, scope) of a run's pruning."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdq.prune import (
    PruneSpec,
    Pruning,
    masked_pruning,
    masks_from_state,
    one_shot_schedule,
    polynomial_schedule,
)

from . import reference as ref

SCHEDULE = polynomial_schedule(initial=0.0, final=0.5, begin=1, end=3, frequency=1)
RULES = [("params/(.*kernel)", PruneSpec())]


def _trainable(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((6, 8)).astype(np.float32),
                "bias": rng.standard_normal(8).astype(np.float32),
            },
            "Dense_1": {"kernel": rng.standard_normal((8, 3)).astype(np.float32)},
        },
        "quant": {"Dense_0": {"kernel": np.float32(0.1)}},
        "distill": {},
    }


def test_fields_are_kept_and_rules_become_a_tuple():
    pruning = Pruning(SCHEDULE, RULES, "global")
    assert pruning.schedule is SCHEDULE
    assert pruning.rules == (("params/(.*kernel)", PruneSpec()),)
    assert pruning.scope == "global"
    assert Pruning(SCHEDULE, RULES).scope == "layer"
    assert Pruning(SCHEDULE, RULES) == Pruning(SCHEDULE, tuple(RULES))
    with pytest.raises(dataclasses.FrozenInstanceError):
        pruning.scope = "layer"


def test_transform_is_masked_pruning_of_its_fields():
    pruning = Pruning(SCHEDULE, RULES, "global")
    reference = masked_pruning(SCHEDULE, RULES, scope="global")
    trainable = jax.tree.map(jnp.asarray, _trainable())
    grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), trainable)
    txs = [optax.chain(optax.sgd(0.1), tx) for tx in (pruning.transform(), reference)]
    states = [tx.init(trainable) for tx in txs]
    params = [trainable, trainable]
    for _ in range(4):
        for i, tx in enumerate(txs):
            updates, states[i] = tx.update(grads, states[i], params[i])
            params[i] = optax.apply_updates(params[i], updates)
        jax.tree.map(np.testing.assert_array_equal, params[0], params[1])
    masks = masks_from_state(states[0])
    assert masks["quant"]["Dense_0"]["kernel"] is None
    assert masks["params"]["Dense_0"]["bias"] is None
    # Global scope: half of the 6*8 + 8*3 kernel weights are pruned in all.
    kernels = [masks["params"][layer]["kernel"] for layer in ("Dense_0", "Dense_1")]
    assert sum(int(np.sum(~np.asarray(m))) for m in kernels) == 36


def test_sparsity_counts_the_zeros_of_the_selected_params():
    params = _trainable()["params"]
    params["Dense_0"]["kernel"][:2] = 0.0  # 16 zeros
    params["Dense_1"]["kernel"][0, 0] = 0.0  # 1 zero
    params["Dense_0"]["bias"][:] = 0.0  # not selected
    pruning = Pruning(one_shot_schedule(0.5), RULES)
    assert pruning.sparsity(params) == 17 / (48 + 24)
    only_first = Pruning(one_shot_schedule(0.5), [("params/Dense_0/kernel", PruneSpec())])
    assert only_first.sparsity(params) == 16 / 48
    with pytest.raises(ValueError, match=r"match no leaf"):
        Pruning(one_shot_schedule(0.5), [("Dense_0/kernel", PruneSpec())]).sparsity(params)


def test_sparsity_after_training_matches_the_numpy_mask():
    pruning = Pruning(one_shot_schedule(0.25), RULES)
    trainable = jax.tree.map(jnp.asarray, _trainable(1))
    tx = optax.chain(optax.sgd(0.0), pruning.transform())
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, trainable), tx.init(trainable), trainable)
    params = optax.apply_updates(trainable, updates)["params"]
    for layer in ("Dense_0", "Dense_1"):
        kernel = _trainable(1)["params"][layer]["kernel"]
        np.testing.assert_array_equal(
            np.asarray(params[layer]["kernel"]) != 0, ref.unstructured_mask(kernel, 0.25)
        )
    # round(0.25 * 48) + round(0.25 * 24) = 12 + 6 pruned of 72.
    assert pruning.sparsity(params) == 18 / 72


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.5, RULES), r"schedule must be a SparsitySchedule, got float"),
        ((SCHEDULE, RULES, "all"), r"scope must be one of \('layer', 'global'\), got scope='all'"),
        ((SCHEDULE, [("params/(", PruneSpec())]), r"rules\[0\] regex 'params/\(' is invalid"),
        ((SCHEDULE, [("params/.*", 0.5)]), r"rules\[0\] value must be"),
        ((SCHEDULE, "params/.*"), r"rules must be a list of \(regex, value\) pairs"),
    ],
)
def test_bad_fields_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        Pruning(*args)
