"""Train / eval step guards: non-finite updates, label shapes, stochastic rounding, PACT decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdq.distill.objective import Objective
from kdq.models import create_model
from kdq.quant import QuantSpec, init_quant_params, learned_state
from kdq.quant.recipe import QuantRecipe
from kdq.train import TrainState, make_eval_step, make_train_step

IMAGE_SHAPE = (4, 4, 1)
CE = Objective.from_config({"ce": {"weight": 1.0}})


def _batch(seed=0, size=8):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(size=(size, *IMAGE_SHAPE)).astype(np.float32),
        "label": rng.integers(0, 5, size=size).astype(np.int32),
    }


def _model_and_params():
    model = create_model("mlp", num_classes=5, hidden=(8,))
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))["params"]


def _copy(tree):
    return jax.tree_util.tree_map(np.array, tree)


@pytest.mark.parametrize("learning_rate", [float("inf"), float("nan")])
def test_a_non_finite_update_is_skipped_and_reported(learning_rate):
    model, params = _model_and_params()
    tx = optax.sgd(learning_rate)
    state = TrainState.create(params=params, tx=tx, key=jax.random.PRNGKey(1))
    before = _copy(state)
    step = make_train_step(model, CE, tx)
    new_state, metrics = step(state, None, _batch())
    # The loss and gradient are finite; only the update is not.
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["finite"]) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, _copy(new_state), before)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(new_state.params))


def test_a_finite_update_is_applied():
    model, params = _model_and_params()
    tx = optax.sgd(0.1)
    state = TrainState.create(params=params, tx=tx, key=jax.random.PRNGKey(1))
    new_state, metrics = make_train_step(model, CE, tx)(state, None, _batch())
    assert float(metrics["finite"]) == 1.0 and int(new_state.step) == 1


@pytest.mark.parametrize(
    "label,match",
    [
        (np.zeros((8, 1), np.int32), r"batch\['label'\] must have shape \(B,\) = \(8,\).*\(8, 1\)"),
        (np.zeros((4,), np.int32), r"must have shape \(B,\) = \(8,\).*got shape \(4,\)"),
        (np.zeros((8,), np.float32), r"integer class indices, got dtype float32"),
    ],
    ids=["column", "short", "float"],
)
def test_label_shapes_are_checked_in_train_and_eval_steps(label, match):
    model, params = _model_and_params()
    tx = optax.sgd(0.1)
    state = TrainState.create(params=params, tx=tx, key=jax.random.PRNGKey(1))
    batch = {**_batch(), "label": label}
    with pytest.raises(ValueError, match=match):
        make_train_step(model, CE, tx)(state, None, batch)
    with pytest.raises(ValueError, match=match):
        make_eval_step(model)({"params": params}, {}, batch)


def test_logits_must_be_batch_by_classes():
    model = create_model("mlp", num_classes=5, hidden=())
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))["params"]

    class Flat:
        def apply(self, variables, x, **kwargs):
            logits = model.apply(variables, x)
            return logits.reshape(-1) if not kwargs.get("mutable") else (logits.reshape(-1), {})

    with pytest.raises(ValueError, match=r"logits of shape \(B, num_classes\) = \(8, C\), got"):
        make_eval_step(Flat())({"params": params}, {}, _batch())


STOCHASTIC = QuantRecipe(
    weight_rules=[(".*kernel", QuantSpec(bits=2, axes=(-1,), rounding="stochastic"))],
    act_rules=[(".*", QuantSpec(bits=3, rounding="stochastic"))],
    act_mode="dynamic",
)


def test_stochastic_rounding_trains_with_fresh_noise_each_step():
    model, params = _model_and_params()
    tx = optax.sgd(0.0)  # params never move: loss differences are the rounding noise
    batch = _batch()

    def losses(recipe, steps=3):
        fresh = jax.tree_util.tree_map(jnp.array, params)  # the step donates its state
        state = TrainState.create(params=fresh, tx=tx, key=jax.random.PRNGKey(1))
        step = make_train_step(model, CE, tx, recipe=recipe)
        out = []
        for _ in range(steps):
            state, metrics = step(state, None, batch)
            assert float(metrics["finite"]) == 1.0
            out.append(float(metrics["loss"]))
        return out

    stochastic = losses(STOCHASTIC)
    nearest = losses(STOCHASTIC.with_nearest_rounding())
    assert len(set(stochastic)) == 3  # a different draw at every step
    assert len(set(nearest)) == 1 and nearest[0] not in stochastic
    assert losses(STOCHASTIC) == stochastic  # the step key makes a run reproducible
    # Evaluation rounds to nearest: deterministic, and equal to the nearest-rounding forward.
    evaluate = make_eval_step(model, recipe=STOCHASTIC)
    nearest_eval = make_eval_step(model, recipe=STOCHASTIC.with_nearest_rounding())
    first = evaluate({"params": params}, {}, batch)
    again = evaluate({"params": params}, {}, batch)
    reference = nearest_eval({"params": params}, {}, batch)
    for name in first:
        assert float(first[name]) == float(again[name]) == float(reference[name])
    np.testing.assert_allclose(float(reference["loss_sum"]) / 8, nearest[0], rtol=1e-5)


@pytest.mark.parametrize("decay", [0.0, 1e-4])
def test_pact_alpha_shrinks_by_its_penalty_when_nothing_clips(decay):
    """Inputs far below alpha: the loss gives alpha no gradient, the penalty lambda alpha^2 does.

    With SGD (rate eta) on u = log alpha: u' = u - eta * d(lambda alpha^2)/du = u - 2 eta lambda alpha^2.
    """
    model, params = _model_and_params()
    recipe = QuantRecipe(
        act_rules=[(".*", QuantSpec(bits=4, signed=False))],
        act_mode="pact",
        pact_alpha_decay=decay,
    )
    batch = _batch()
    quant_params = init_quant_params(model, {"params": params}, recipe, [batch["image"]])
    # alpha = 50: no input (pixels in [0, 1), hidden ReLU outputs) comes near it.
    quant_params["activations"] = jax.tree_util.tree_map(
        lambda _: learned_state(50.0 / 15, recipe.act_rules[0][1], "pact")["log_alpha"],
        quant_params["activations"],
    )
    eta = 0.5
    tx = optax.sgd(eta)
    state = TrainState.create(
        params=params, tx=tx, key=jax.random.PRNGKey(1), quant_params=quant_params
    )
    step = make_train_step(model, CE, tx, recipe=recipe)
    u = np.float64(np.log(50.0))
    for i in range(3):
        state, metrics = step(state, None, _batch(seed=i))
        alpha = np.exp(u)
        if decay:  # two quantized inputs (Dense_0, Dense_1), both at alpha before the update
            penalty = float(metrics["loss/pact_alpha_decay"])
            np.testing.assert_allclose(penalty, 2 * decay * alpha**2, rtol=1e-5)
        u = u - eta * 2 * decay * alpha**2
        for path in ("Dense_0", "Dense_1"):
            got = float(state.quant_params["activations"][path]["log_alpha"])
            np.testing.assert_allclose(got, u, rtol=1e-5, atol=1e-6)
    assert (u < np.log(50.0) - 0.4) if decay else (u == np.log(50.0))
