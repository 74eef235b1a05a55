"""Initialisation of learned quantizers, PACT's alpha penalty and recipe checks for them."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from kdq.models import create_model
from kdq.quant import QuantSpec, init_quant_params, quantizer_penalties
from kdq.quant.recipe import DEFAULT_PACT_ALPHA_DECAY, QuantRecipe


@pytest.fixture(scope="module")
def mlp():
    model = create_model("mlp", num_classes=4, hidden=(8,))
    x = np.random.default_rng(0).normal(size=(16, 3, 3, 1)).astype(np.float32)
    return model, model.init(jax.random.PRNGKey(0), x), x


def test_lsq_paper_init_is_two_mean_abs_over_sqrt_qp(mlp):
    """Esser et al. 2020: s0 = 2 <|v|> / sqrt(Q_P), per step group (here per output channel)."""
    model, variables, x = mlp
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=4, axes=(-1,)))],
        act_rules=[("Dense_0", QuantSpec(bits=3))],
        weight_mode="lsq",
        act_mode="lsq",
    )
    state = init_quant_params(model, variables, recipe, [x], lsq_init="paper")
    for layer in ("Dense_0", "Dense_1"):
        w = np.asarray(variables["params"][layer]["kernel"], np.float64)
        expected = 2 * np.abs(w).mean(axis=0, keepdims=True) / math.sqrt(7)
        got = np.exp(np.asarray(state["weights"][layer]["kernel"]["log_step"], np.float64))
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Dense_0's input is the image itself: <|x|> over the batch, Q_P = 3 at 3 bits signed.
    expected = 2 * np.abs(x.astype(np.float64)).mean() / math.sqrt(3)
    got = np.exp(float(state["activations"]["Dense_0"]["log_step"]))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    calibrated = init_quant_params(model, variables, recipe, [x])
    w = np.asarray(variables["params"]["Dense_1"]["kernel"], np.float64)
    np.testing.assert_allclose(
        np.exp(np.asarray(calibrated["weights"]["Dense_1"]["kernel"]["log_step"], np.float64)),
        np.abs(w).max(axis=0, keepdims=True) / 7,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match=r"lsq_init must be one of .*got lsq_init='lsq'"):
        init_quant_params(model, variables, recipe, [x], lsq_init="lsq")


def test_pact_penalty_is_lambda_sum_alpha_squared(mlp):
    model, variables, x = mlp
    recipe = QuantRecipe(
        act_rules=[(".*", QuantSpec(bits=4, signed=False))], act_mode="pact", pact_alpha_decay=0.5
    )
    state = init_quant_params(model, variables, recipe, [x])
    alphas = [np.exp(float(state["activations"][p]["log_alpha"])) for p in ("Dense_0", "Dense_1")]
    penalties = quantizer_penalties(state, recipe)
    assert list(penalties) == ["pact_alpha_decay"]
    np.testing.assert_allclose(
        float(penalties["pact_alpha_decay"]), 0.5 * sum(a * a for a in alphas), rtol=1e-5
    )
    lsq = QuantRecipe(act_rules=recipe.act_rules, act_mode="lsq")
    assert quantizer_penalties(state, lsq) == {}
    no_decay = QuantRecipe(act_rules=recipe.act_rules, act_mode="pact", pact_alpha_decay=0.0)
    assert quantizer_penalties(state, no_decay) == {}


def test_recipe_pact_alpha_decay_and_stochastic_learned_modes_are_checked():
    assert QuantRecipe().pact_alpha_decay == DEFAULT_PACT_ALPHA_DECAY == 2e-4
    for bad in (-1e-4, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match=r"pact_alpha_decay must be a finite number >= 0"):
            QuantRecipe(pact_alpha_decay=bad)
    stochastic = QuantSpec(bits=4, rounding="stochastic")
    with pytest.raises(ValueError, match=r"weight_rules '\.\*'.*stochastic.*lsq quantizers"):
        QuantRecipe(weight_rules=[(".*", stochastic)], weight_mode="lsq")
    with pytest.raises(ValueError, match=r"act_rules '\.\*'.*stochastic.*pact quantizers"):
        QuantRecipe(
            act_rules=[(".*", QuantSpec(signed=False, rounding="stochastic"))], act_mode="pact"
        )
    recipe = QuantRecipe(weight_rules=[(".*", stochastic)], pact_alpha_decay=1e-3)
    assert QuantRecipe.from_json(recipe.to_json()) == recipe
    old = recipe.to_json().replace(', "pact_alpha_decay": 0.001', "")
    assert "pact_alpha_decay" not in old
    assert QuantRecipe.from_json(old).pact_alpha_decay == DEFAULT_PACT_ALPHA_DECAY
    nearest = recipe.with_nearest_rounding()
    assert nearest.weight_rules[0][1] == QuantSpec(bits=4) and not nearest.stochastic


def test_static_ranges_of_a_stochastic_weight_recipe_are_measured_through_nearest_rounding(mlp):
    model, variables, x = mlp
    act_rules = [(".*", QuantSpec(bits=8))]

    def recipe(rounding):
        spec = QuantSpec(bits=4, axes=(-1,), rounding=rounding)
        return QuantRecipe(
            weight_rules=[(".*kernel", spec)], act_rules=act_rules, act_mode="static"
        )

    stochastic = init_quant_params(model, variables, recipe("stochastic"), [x])
    nearest = init_quant_params(model, variables, recipe("nearest"), [x])
    leaves = jax.tree_util.tree_leaves_with_path(stochastic["activations"])
    assert leaves
    for (path, got), want in zip(
        leaves, jax.tree_util.tree_leaves(nearest["activations"]), strict=True
    ):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
