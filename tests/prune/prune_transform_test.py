"""kdq.prune.masked_pruning in optax chains, checked against the numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdq.prune import (
    PruneSpec,
    PruneState,
    masked_pruning,
    masks_from_state,
    one_shot_schedule,
    polynomial_schedule,
    sparsity_of,
)

from . import reference as ref

SCHEDULE = polynomial_schedule(initial=0.0, final=0.75, begin=10, end=110, frequency=10)
STEPS = 200


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    teacher = rng.standard_normal((8, 4)).astype(np.float32)
    y = np.tanh(x @ teacher)
    params = {
        "hidden": {
            "kernel": (0.5 * rng.standard_normal((8, 16))).astype(np.float32),
            "bias": np.zeros(16, np.float32),
        },
        "out": {
            "kernel": (0.5 * rng.standard_normal((16, 4))).astype(np.float32),
            "bias": np.zeros(4, np.float32),
        },
    }
    return jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y)


def _loss(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


def _reference_mask(w, g, spec, sparsity):
    grad = g if spec.importance == "taylor" else None
    if spec.structure == "n:m":
        return ref.nm_mask(w, spec.n, spec.m, grad=grad)
    if spec.structure == "channel":
        return ref.channel_mask(w, sparsity, spec.norm, grad=grad)
    return ref.unstructured_mask(w, sparsity, grad=grad)


CONFIGS = {
    "adamw/unstructured+2:4": (
        optax.adamw(1e-2, weight_decay=1e-2),
        {"hidden": PruneSpec(), "out": PruneSpec(structure="n:m", n=2, m=4)},
    ),
    "sgd-momentum/channel-l1+taylor": (
        optax.sgd(0.05, momentum=0.9),
        {
            "hidden": PruneSpec(structure="channel", norm="l1"),
            "out": PruneSpec(importance="taylor"),
        },
    ),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_training_keeps_pruned_weights_exactly_zero(config):
    optimizer, specs = CONFIGS[config]
    rules = [(f"{layer}/kernel", spec) for layer, spec in specs.items()]
    tx = optax.chain(optimizer, masked_pruning(SCHEDULE, rules))
    params, x, y = _problem()
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, grads=grads)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    masks = masks_from_state(opt_state)
    assert masks["hidden"]["bias"] is None and masks["out"]["bias"] is None
    losses = []
    for t in range(STEPS):
        before = jax.tree.map(np.asarray, params)
        params, opt_state, loss, grads = train_step(params, opt_state)
        losses.append(float(loss))
        new_masks = masks_from_state(opt_state)
        for layer, spec in specs.items():
            old, new = np.asarray(masks[layer]["kernel"]), np.asarray(new_masks[layer]["kernel"])
            if SCHEDULE.should_update(t):
                s = ref.polynomial(t, 0.0, 0.75, 10, 110, 10)
                w, g = before[layer]["kernel"], np.asarray(grads[layer]["kernel"])
                np.testing.assert_array_equal(new, _reference_mask(w, g, spec, s), err_msg=f"{t}")
            else:
                np.testing.assert_array_equal(new, old, err_msg=f"mask changed at step {t}")
            assert not np.any(new & ~old), f"a pruned weight of {layer} came back at step {t}"
            kernel = np.asarray(params[layer]["kernel"])
            assert np.all(kernel[~new] == 0.0), f"pruned {layer} weight moved at step {t}"
        masks = new_masks

    if "2:4" in config:
        # Exactly 2 non-zeros in every group of 4 inputs: kept weights trained, the rest 0.
        groups = np.moveaxis(np.asarray(params["out"]["kernel"]), -2, -1).reshape(-1, 4)
        np.testing.assert_array_equal(np.count_nonzero(groups, axis=-1), 2)
    report = sparsity_of(masks)
    assert report.per_layer["out/kernel"] == (0.5 if "2:4" in config else 0.75)
    assert report.per_layer["hidden/kernel"] == 0.75
    assert sparsity_of(params, rules).per_layer == report.per_layer
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < losses[110], "training should still improve after the last prune"


def test_global_scope_prunes_round_s_of_all_selected_weights():
    tx = optax.chain(
        optax.adam(1e-2), masked_pruning(SCHEDULE, [(r".*/kernel", PruneSpec())], scope="global")
    )
    params, x, y = _problem(1)
    opt_state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, x, y), s, p))
    for t in range(60):
        before = jax.tree.map(np.asarray, params)
        updates, opt_state = step(params, opt_state)
        params = optax.apply_updates(params, updates)
        if SCHEDULE.should_update(t):
            masks = masks_from_state(opt_state)
            s = ref.polynomial(t, 0.0, 0.75, 10, 110, 10)
            expected = ref.global_masks([before["hidden"]["kernel"], before["out"]["kernel"]], s)
            np.testing.assert_array_equal(masks["hidden"]["kernel"], expected[0])
            np.testing.assert_array_equal(masks["out"]["kernel"], expected[1])
            assert sparsity_of(masks).pruned == round(s * (128 + 64))


def test_one_step_semantics_without_jit():
    """Kept weights get the optimizer's update, pruned weights become exactly zero."""
    params, x, y = _problem(2)
    rules = [("hidden/kernel", PruneSpec())]
    tx = optax.chain(optax.sgd(0.1), masked_pruning(one_shot_schedule(0.5, begin=1), rules))
    state = tx.init(params)
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_array_equal(updates["hidden"]["kernel"], -0.1 * grads["hidden"]["kernel"])
    params = optax.apply_updates(params, updates)
    assert masks_from_state(state)["hidden"]["kernel"].all()

    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    w = np.asarray(params["hidden"]["kernel"])
    mask = ref.unstructured_mask(w, 0.5)
    np.testing.assert_array_equal(masks_from_state(state)["hidden"]["kernel"], mask)
    new = np.asarray(optax.apply_updates(params, updates)["hidden"]["kernel"])
    np.testing.assert_array_equal(new[~mask], 0.0)
    np.testing.assert_allclose(new[mask], (w - 0.1 * np.asarray(grads["hidden"]["kernel"]))[mask])
    np.testing.assert_array_equal(updates["out"]["kernel"], -0.1 * grads["out"]["kernel"])
    assert int(state[1].count) == 2


def test_pruning_first_in_the_chain_does_not_keep_zeros():
    """The documented order matters: momentum after pruning moves pruned weights."""
    params, x, y = _problem(3)
    tx = optax.chain(
        masked_pruning(one_shot_schedule(0.5, begin=5), [("hidden/kernel", PruneSpec())]),
        optax.sgd(0.05, momentum=0.9),
    )
    opt_state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, x, y), s, p))
    for _ in range(20):
        updates, opt_state = step(params, opt_state)
        params = optax.apply_updates(params, updates)
    mask = np.asarray(masks_from_state(opt_state)["hidden"]["kernel"])
    assert np.any(np.asarray(params["hidden"]["kernel"])[~mask] != 0.0)


def test_masks_from_state_combines_several_transforms():
    params, _, _ = _problem(4)
    first = masked_pruning(one_shot_schedule(0.5), [("hidden/kernel", PruneSpec())])
    second = masked_pruning(
        one_shot_schedule(0.25), [(r".*/kernel", PruneSpec(structure="channel"))]
    )
    tx = optax.chain(optax.sgd(0.0), first, second)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, state = tx.update(zeros, state, params)
    w_hidden, w_out = np.asarray(params["hidden"]["kernel"]), np.asarray(params["out"]["kernel"])
    masks = masks_from_state(state)
    np.testing.assert_array_equal(
        masks["hidden"]["kernel"],
        ref.unstructured_mask(w_hidden, 0.5) & ref.channel_mask(w_hidden, 0.25, "l2"),
    )
    np.testing.assert_array_equal(masks["out"]["kernel"], ref.channel_mask(w_out, 0.25, "l2"))
    assert masks["hidden"]["bias"] is None
    assert isinstance(state[1], PruneState)


def test_bad_use_is_rejected():
    params, _, _ = _problem(5)
    taylor = masked_pruning(SCHEDULE, [(r".*/kernel", PruneSpec(importance="taylor"))])
    state = taylor.init(params)
    with pytest.raises(ValueError, match=r"needs the params"):
        taylor.update(params, state)
    with pytest.raises(ValueError, match=r"importance='taylor' needs the loss gradient"):
        taylor.update(params, state, params)
    fixed = masked_pruning(SCHEDULE, [(r".*/kernel", PruneSpec(sparsity=0.5))])
    with pytest.raises(ValueError, match=r"spec of 'hidden/kernel' has sparsity=0.5"):
        fixed.init(params)
    with pytest.raises(ValueError, match=r"schedule must be a SparsitySchedule, got float"):
        masked_pruning(0.5, [(r".*/kernel", PruneSpec())])
    with pytest.raises(ValueError, match=r"opt_state holds no PruneState"):
        masks_from_state(optax.sgd(0.1).init(params))
