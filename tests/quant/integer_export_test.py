"""Exported LSQ / PACT models compute what QAT trained, on the integer path too.

The quantizer state is perturbed away from its calibration (so export cannot
agree by accident) and the inputs reach beyond the clipping values on both
sides. References: numpy on the exported integers and scales, and the paper
definitions of the forward passes (tests/quant/ste_test.py).
"""

from __future__ import annotations

import flax
import jax
import numpy as np
import pytest

from kdq.models import create_model
from kdq.quant import QuantSpec, apply_quantized, init_quant_params
from kdq.quant.integer import fake_quant_apply, integer_apply, to_qat_state, to_quantized_model
from kdq.quant.recipe import QuantRecipe

EPS = float(np.finfo(np.float32).eps)


def _perturbed_state(quant_params, seed):
    """Every learned log step / log alpha shifted by log(U[0.4, 0.8]): smaller ranges, more clipping."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda u: u + np.log(rng.uniform(0.4, 0.8, size=np.shape(u))).astype(np.float32),
        quant_params,
    )


def _recipe(act_mode, signed):
    return QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=4, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=4, signed=signed))],
        weight_mode="lsq",
        act_mode=act_mode,
    )


def _numpy_layer(x, qlayer, s_x, spec):
    """float64 y = (q_x @ q_w) s_x s_w + b from the exported integers (q_x by float32 IEEE division)."""
    q_x = np.clip(np.round(x / np.float32(s_x)), spec.qmin, spec.qmax).astype(np.int64)
    kernel = qlayer["kernel"]
    q_w = np.asarray(kernel.qvalue).astype(np.int64)
    s_w = np.asarray(kernel.scale, np.float64).reshape(-1)
    exact = (q_x @ q_w).astype(np.float64) * (np.float64(s_x) * s_w)
    magnitude = (np.abs(q_x) * np.float64(s_x)) @ (np.abs(q_w) * s_w)
    return exact + np.asarray(qlayer["bias"], np.float64), magnitude, q_x


@pytest.mark.parametrize("act_mode", ["lsq", "pact"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_exported_learned_quantizers_agree_with_the_qat_forward(act_mode, signed):
    model = create_model("mlp", num_classes=6, hidden=())
    rng = np.random.default_rng(3)
    calibration = rng.normal(size=(32, 4, 4, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), calibration)
    recipe = _recipe(act_mode, signed)
    quant_params = _perturbed_state(init_quant_params(model, variables, recipe, [calibration]), 1)
    x = (3 * rng.normal(size=(64, 4, 4, 1))).astype(np.float32)  # beyond the ranges

    qat = np.asarray(
        jax.jit(lambda v, q, x: apply_quantized(model, v, x, recipe=recipe, quant_params=q))(
            variables, quant_params, x
        )
    )
    qmodel = to_quantized_model(variables["params"], recipe, quant_params)
    y_int = np.asarray(jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x))
    y_fq = np.asarray(jax.jit(lambda q, x: fake_quant_apply(model, q, x))(qmodel, x))

    spec = recipe.act_rules[0][1]
    s_x = float(qmodel.act_scales["Dense_0"]["scale"])
    state = quant_params["activations"]["Dense_0"]
    # The exported scale is the trained one: step, or alpha / qmax.
    trained = np.exp(np.float64(state["log_step" if act_mode == "lsq" else "log_alpha"]))
    if act_mode == "pact":
        trained /= spec.qmax
    np.testing.assert_allclose(s_x, trained, rtol=1e-6)
    flat_x = x.reshape(64, -1)
    exact, magnitude, q_x = _numpy_layer(flat_x, qmodel.params["Dense_0"], s_x, spec)
    # The test reaches both ends of the integer range and beyond (PACT: beyond alpha).
    assert np.any(q_x == spec.qmax) and np.any(flat_x > (spec.qmax + 1) * s_x)
    assert np.any(q_x == spec.qmin)
    if signed:
        assert np.any(flat_x < (spec.qmin - 1) * s_x)
    bound = (q_x.shape[1] + 3) * EPS * magnitude + 4 * EPS * np.abs(exact)
    for name, y in (("qat", qat), ("integer", y_int), ("fake_quant_apply", y_fq)):
        assert np.all(np.abs(y - exact) <= bound), name


@pytest.mark.parametrize("act_mode", ["lsq", "pact"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_two_layer_exports_predict_like_qat(act_mode, signed):
    """Hidden ReLU layer in between: integer and QAT logits agree to one step of the last layer."""
    model = create_model("mlp", num_classes=6, hidden=(12,))
    rng = np.random.default_rng(5)
    calibration = rng.normal(size=(32, 4, 4, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(1), calibration)
    recipe = _recipe(act_mode, signed)
    quant_params = _perturbed_state(init_quant_params(model, variables, recipe, [calibration]), 2)
    x = (3 * rng.normal(size=(64, 4, 4, 1))).astype(np.float32)
    qat = np.asarray(apply_quantized(model, variables, x, recipe=recipe, quant_params=quant_params))
    qmodel = to_quantized_model(variables["params"], recipe, quant_params)
    y_int = np.asarray(jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x))
    last = qmodel.params["Dense_1"]["kernel"]
    step = float(qmodel.act_scales["Dense_1"]["scale"])
    w_hat = np.asarray(last.qvalue, np.float64) * np.asarray(last.scale, np.float64)
    one_step = step * np.abs(w_hat).sum(0) + 1e-5
    assert np.all(np.abs(y_int - qat) <= one_step)
    close = np.all(np.abs(y_int - qat) <= 1e-5 * (1 + np.abs(qat)), axis=-1)
    assert close.mean() >= 0.9


def test_stochastic_recipes_export_round_to_nearest():
    model = create_model("mlp", num_classes=3, hidden=())
    x = np.random.default_rng(0).normal(size=(8, 2, 2, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    stochastic = QuantSpec(bits=4, axes=(-1,), rounding="stochastic")
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", stochastic)],
        act_rules=[(".*", QuantSpec(bits=8, rounding="stochastic"))],
        act_mode="dynamic",
    )
    qmodel = to_quantized_model(variables["params"], recipe)
    assert qmodel.recipe == recipe.with_nearest_rounding()
    kernel = np.asarray(variables["params"]["Dense_0"]["kernel"])
    scale = np.abs(kernel).max(0) / 7
    np.testing.assert_array_equal(
        np.asarray(qmodel.params["Dense_0"]["kernel"].qvalue, np.int32),
        np.clip(np.round(kernel / scale), -8, 7),
    )
    assert np.all(np.isfinite(np.asarray(integer_apply(model, qmodel, x))))


def test_to_qat_state_round_trip_keeps_the_learned_state():
    model = create_model("mlp", num_classes=4, hidden=(8,))
    x = np.random.default_rng(1).normal(size=(16, 3, 3, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    for act_mode in ("lsq", "pact"):
        recipe = _recipe(act_mode, True)
        quant_params = _perturbed_state(init_quant_params(model, variables, recipe, [x]), 3)
        qmodel = to_quantized_model(variables["params"], recipe, quant_params)
        _, state = to_qat_state(qmodel)
        flat = flax.traverse_util.flatten_dict(state)
        expected = flax.traverse_util.flatten_dict(quant_params)
        assert flat.keys() == expected.keys()
        for key in flat:
            # log values: exp(log(s)) rounds to a relative 1e-6 of s
            np.testing.assert_allclose(flat[key], expected[key], atol=2e-6)
        again = to_quantized_model(*to_qat_state(qmodel)[:1], recipe, state)
        for layer in ("Dense_0", "Dense_1"):
            np.testing.assert_array_equal(
                np.asarray(again.params[layer]["kernel"].qvalue, np.int32),
                np.asarray(qmodel.params[layer]["kernel"].qvalue, np.int32),
            )
