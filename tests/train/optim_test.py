"""kdq.train.optim: the run's optimizer, against optax chains and numpy references."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdq.prune import PruneState, masks_from_state
from kdq.train import config as config_lib
from kdq.train import default_config
from kdq.train.optim import learning_rate_schedule, make_optimizer
from kdq.train.state import TRAINABLE

STEPS, WARMUP, NUM_STEPS = 6, 2, 10


def _config(name="adamw", **optimizer):
    config = default_config()
    config.num_steps = NUM_STEPS
    config.optimizer.name = name
    config.optimizer.warmup_steps = WARMUP
    config.optimizer.weight_decay = 0.0 if name == "adam" else 0.1
    for field, value in optimizer.items():
        config.optimizer[field] = value
    config_lib.validate(config)
    return config


def _trainable(seed=0):
    rng = np.random.default_rng(seed)
    tree = {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((4, 3)),
                "bias": rng.standard_normal(3),
            }
        },
        "quant": {"Dense_0": {"kernel": np.float64(0.3)}, "act": {"alpha": rng.uniform(1, 2, 2)}},
        "distill": {"proj": {"kernel": rng.standard_normal((3, 2))}},
    }
    assert tuple(tree) == TRAINABLE
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _grads(tree, steps=STEPS, seed=1):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)
        for _ in range(steps)
    ]


def _run(tx, tree, grads):
    """The updates of each step, applying them as training does."""
    state, history = tx.init(tree), []
    for g in grads:
        updates, state = tx.update(g, state, tree)
        tree = optax.apply_updates(tree, updates)
        history.append(updates)
    return history, state


def _decay(tree):
    return {name: jax.tree.map(lambda _, d=name != "quant": d, sub) for name, sub in tree.items()}


def _reference(config):
    """The run optimizer written out as one optax chain (quantizer state at the params' rate)."""
    opt = config.optimizer
    if opt.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, WARMUP, NUM_STEPS)
    else:
        warmup = optax.linear_schedule(0.0, opt.learning_rate, WARMUP)
        lr = optax.join_schedules([warmup, optax.constant_schedule(opt.learning_rate)], [WARMUP])
    tx = {
        "adamw": lambda: optax.adamw(lr, weight_decay=opt.weight_decay, mask=_decay),
        "adam": lambda: optax.adam(lr),
        "sgd": lambda: optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask=_decay),
            optax.sgd(lr, momentum=opt.momentum, nesterov=True),
        ),
    }[opt.name]()
    if opt.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx


def _assert_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


CASES = list(itertools.product(("adamw", "adam", "sgd"), (0.0, 0.5), ("cosine", "constant")))


@pytest.mark.parametrize(("name", "clip", "schedule"), CASES, ids=lambda v: str(v))
def test_zero_quant_learning_rate_is_one_optimizer_over_the_tree(name, clip, schedule):
    config = _config(name, grad_clip_norm=clip, schedule=schedule)
    tree = _trainable()
    tx, reference = make_optimizer(config, None), _reference(config)
    assert jax.tree.structure(tx.init(tree)) == jax.tree.structure(reference.init(tree))
    grads = _grads(tree)
    for got, want in zip(_run(tx, tree, grads)[0], _run(reference, tree, grads)[0], strict=True):
        _assert_equal(got, want)


def _numpy_learning_rate(t, peak, schedule="cosine"):
    if t < WARMUP:
        return peak * t / WARMUP
    if schedule == "constant":
        return peak
    return (
        peak
        * (1 + math.cos(math.pi * min(t - WARMUP, NUM_STEPS - WARMUP) / (NUM_STEPS - WARMUP)))
        / 2
    )


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedule(schedule):
    config = _config(schedule=schedule)
    lr = learning_rate_schedule(config, 0.25)
    for t in range(NUM_STEPS + 3):
        np.testing.assert_allclose(
            float(lr(t)), _numpy_learning_rate(t, 0.25, schedule), rtol=1e-5, atol=1e-9
        )


def _numpy_adam(grads, peak, b1=0.9, b2=0.999, eps=1e-8):
    """Adam's updates of one leaf: -lr_t * m_hat / (sqrt(v_hat) + eps), in float64."""
    m = v = 0.0
    updates = []
    for t, g in enumerate(np.asarray(g, np.float64) for g in grads):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        updates.append(-_numpy_learning_rate(t, peak) * m_hat / (np.sqrt(v_hat) + eps))
    return updates


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_quant_learning_rate_steps_the_quantizer_state_at_its_rate(name):
    tree = _trainable()
    grads = _grads(tree)
    config = _config(name, quant_learning_rate=0.05)
    history, _ = _run(make_optimizer(config, None), tree, grads)
    # The params and loss params keep the run's optimizer, bitwise.
    same_rate, _ = _run(make_optimizer(_config(name), None), tree, grads)
    for got, want in zip(history, same_rate, strict=True):
        _assert_equal(
            {k: got[k] for k in ("params", "distill")}, {k: want[k] for k in ("params", "distill")}
        )
    # The quantizer state: Adam at peak 0.05, no weight decay.
    per_step = [jax.tree.leaves(g["quant"]) for g in grads]
    got = [jax.tree.leaves(u["quant"]) for u in history]
    for i in range(len(per_step[0])):
        want = _numpy_adam([leaves[i] for leaves in per_step], 0.05)
        np.testing.assert_allclose([leaves[i] for leaves in got], want, rtol=2e-5, atol=1e-9)
    assert float(np.abs(np.asarray(history[-1]["quant"]["Dense_0"]["kernel"]))) > 0


def test_quant_learning_rate_with_sgd_and_clipping():
    tree = _trainable()
    grads = _grads(tree)
    config = _config("sgd", quant_learning_rate=0.5, grad_clip_norm=1.0, momentum=0.0)
    history, _ = _run(make_optimizer(config, None), tree, grads)
    for t, (g, u) in enumerate(zip(grads, history, strict=True)):
        # One global norm over the whole tree, then plain SGD at each subtree's rate.
        norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g)))
        scale = min(1.0, 1.0 / norm)
        for leaf_g, leaf_u in zip(
            jax.tree.leaves(g["quant"]), jax.tree.leaves(u["quant"]), strict=True
        ):
            want = -_numpy_learning_rate(t, 0.5) * scale * np.asarray(leaf_g, np.float64)
            np.testing.assert_allclose(leaf_u, want, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "quant_learning_rate"), list(itertools.product(("adamw", "sgd"), (0.0, 0.05)))
)
def test_weight_decay_never_touches_the_quantizer_state(name, quant_learning_rate):
    # With zero gradients the update is the weight decay alone: -lr_t * 0.1 * w for
    # the params and loss params (Adam's moments stay 0), 0 for the quantizer state.
    tree = _trainable()
    config = _config(name, quant_learning_rate=quant_learning_rate, momentum=0.0)
    tx = make_optimizer(config, None)
    state = tx.init(tree)
    for t in range(STEPS):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, tree), state, tree)
        for leaf in jax.tree.leaves(updates["quant"]):
            np.testing.assert_array_equal(leaf, 0.0)
        for key in ("params", "distill"):
            for got, w in zip(
                jax.tree.leaves(updates[key]), jax.tree.leaves(tree[key]), strict=True
            ):
                want = -_numpy_learning_rate(t, 3e-3) * 0.1 * np.asarray(w, np.float64)
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
        tree = optax.apply_updates(tree, updates)


def test_pruning_comes_last_and_keeps_pruned_weights_zero():
    config = _config(quant_learning_rate=0.05, grad_clip_norm=1.0)
    config.prune.structure, config.prune.sparsity = "unstructured", 0.5
    config.prune.begin, config.prune.end, config.prune.frequency = 1, 3, 1
    pruning = config_lib.pruning(config)
    tx = make_optimizer(config, pruning)
    tree = _trainable()
    state = tx.init(tree)
    assert isinstance(state[-1], PruneState)  # the chain's last transform
    for g in _grads(tree, 8):
        updates, state = tx.update(g, state, tree)
        tree = optax.apply_updates(tree, updates)
        masks = masks_from_state(state)
        kernel = np.asarray(tree["params"]["Dense_0"]["kernel"])
        keep = np.asarray(masks["params"]["Dense_0"]["kernel"])
        np.testing.assert_array_equal(kernel[~keep], 0.0)
    assert masks["quant"]["Dense_0"]["kernel"] is None
    assert pruning.sparsity(tree["params"]) == 0.5
    assert np.all(np.asarray(tree["params"]["Dense_0"]["bias"]) != 0.0)


def test_an_unchecked_optimizer_name_or_schedule_is_refused():
    config = ml_collections.ConfigDict(_config().to_dict(), type_safe=False)
    config.optimizer.schedule = "linear"
    with pytest.raises(ValueError, match=r"config.optimizer.schedule must be 'cosine' or"):
        make_optimizer(config, None)
    config.optimizer.schedule, config.optimizer.name = "cosine", "lamb"
    with pytest.raises(ValueError, match=r"config.optimizer.name must be 'adamw', 'adam' or"):
        make_optimizer(config, None)
