import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from kdq.quant import QuantSpec
from kdq.quant.calibration import calibrate_activations
from kdq.quant.recipe import QuantRecipe


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="second")(nn.relu(nn.Dense(8, name="first")(x)))


@pytest.fixture
def setup():
    model = TwoLayer()
    rng = np.random.default_rng(0)
    batches = [rng.normal(scale=s, size=(16, 5)).astype(np.float32) for s in (1.0, 3.0, 0.5, 2.0)]
    variables = model.init(jax.random.PRNGKey(0), batches[0])
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    second_inputs = [np.maximum(b @ p["first"]["kernel"] + p["first"]["bias"], 0) for b in batches]
    return model, variables, batches, second_inputs


def _scales(state):
    return float(state["first"]["scale"]), float(state["second"]["scale"])


def test_minmax_is_the_max_over_batches(setup):
    model, variables, batches, second_inputs = setup
    spec = QuantSpec(bits=8)
    recipe = QuantRecipe(act_rules=[(".*", spec)], act_mode="static")
    state = calibrate_activations(model, variables, batches, recipe, method="minmax")
    expected_first = max(np.abs(b).max() for b in batches) / 127
    expected_second = max(np.abs(h).max() for h in second_inputs) / 127
    np.testing.assert_allclose(_scales(state), (expected_first, expected_second), rtol=1e-6)


def test_ema_of_batch_ranges(setup):
    model, variables, batches, second_inputs = setup
    recipe = QuantRecipe(act_rules=[(".*", QuantSpec(bits=8))], act_mode="static")
    state = calibrate_activations(model, variables, batches, recipe, method="ema", ema_decay=0.5)

    def ema(values):
        m = values[0]
        for v in values[1:]:
            m = 0.5 * m + 0.5 * v
        return m

    expected = (
        ema([np.abs(b).max() for b in batches]) / 127,
        ema([np.abs(h).max() for h in second_inputs]) / 127,
    )
    np.testing.assert_allclose(_scales(state), expected, rtol=1e-6)


def test_percentile_is_the_mean_of_batch_percentiles(setup):
    model, variables, batches, second_inputs = setup
    recipe = QuantRecipe(act_rules=[(".*", QuantSpec(bits=8))], act_mode="static")
    state = calibrate_activations(model, variables, batches, recipe, method="percentile,99")
    expected = (
        np.mean([np.percentile(np.abs(b), 99) for b in batches]) / 127,
        np.mean([np.percentile(np.abs(h), 99) for h in second_inputs]) / 127,
    )
    np.testing.assert_allclose(_scales(state), expected, rtol=1e-5)


def test_affine_ranges_give_scale_and_zero_point(setup):
    model, variables, batches, _ = setup
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    recipe = QuantRecipe(act_rules=[("first", spec)], act_mode="static")
    state = calibrate_activations(model, variables, batches, recipe, method="minmax")
    lo = min(b.min() for b in batches)
    hi = max(b.max() for b in batches)
    scale = np.float32(hi - lo) / np.float32(255)
    np.testing.assert_allclose(float(state["first"]["scale"]), scale, rtol=1e-6)
    assert int(state["first"]["zero_point"]) == int(np.round(-lo / scale))
    assert "second" not in state


def test_bad_method_and_no_batches(setup):
    model, variables, batches, _ = setup
    recipe = QuantRecipe(act_rules=[(".*", QuantSpec())], act_mode="static")
    with pytest.raises(ValueError, match="method must be one of.*method='median'"):
        calibrate_activations(model, variables, batches, recipe, method="median")
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_activations(model, variables, [], recipe)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        calibrate_activations(model, variables, batches, recipe, method="ema", ema_decay=1.0)


@pytest.mark.parametrize("p", [30.0, 2.5])
@pytest.mark.parametrize("signed", [True, False])
def test_affine_percentile_range_matches_numpy_for_any_p(setup, p, signed):
    """lo = mean_b P_min(p, 100-p)(x_b), hi = mean_b P_max(p, 100-p)(x_b), whichever side p is on.

    With p < 50 the bounds used to swap: lo = P_70 > 0 and hi = P_30 < 0 were then
    widened to [0, 0] and every activation quantized to the zero point (scale 1).
    """
    model, variables, batches, _ = setup
    spec = QuantSpec(bits=8, signed=signed, symmetric=False)
    recipe = QuantRecipe(act_rules=[("first", spec)], act_mode="static")
    state = calibrate_activations(model, variables, batches, recipe, method=f"percentile,{p}")
    low, high = min(p, 100 - p), max(p, 100 - p)
    lo = np.float32(np.mean([np.percentile(b, low) for b in batches]))
    hi = np.float32(np.mean([np.percentile(b, high) for b in batches]))
    assert lo < 0 < hi
    qmin, qmax = (-128, 127) if signed else (0, 255)
    scale = (hi - lo) / np.float32(qmax - qmin)
    np.testing.assert_allclose(float(state["first"]["scale"]), scale, rtol=1e-5)
    expected_zero = np.clip(qmin - np.round(lo / scale), qmin, qmax)
    assert int(state["first"]["zero_point"]) == int(expected_zero)
    # p and 100 - p name the same range
    other = calibrate_activations(model, variables, batches, recipe, method=f"percentile,{100 - p}")
    np.testing.assert_array_equal(
        np.asarray(other["first"]["scale"]), np.asarray(state["first"]["scale"])
    )


def test_non_finite_activations_are_rejected_naming_module_and_batches(setup):
    model, variables, batches, _ = setup
    batches = [b.copy() for b in batches]
    batches[1][3, 2] = np.nan
    batches[3][0, 0] = np.inf
    recipe = QuantRecipe(
        act_rules=[("first", QuantSpec(bits=8, symmetric=False))], act_mode="static"
    )
    for method in ("minmax", "ema", "percentile,99"):
        with pytest.raises(
            ValueError, match=r"input of 'first' has a non-finite range.*batch\(es\) \[1, 3\] of 4"
        ):
            calibrate_activations(model, variables, batches, recipe, method=method)


@pytest.mark.parametrize("ema_decay", ["0.5", None, True, float("nan"), -0.1])
def test_bad_ema_decay(setup, ema_decay):
    model, variables, batches, _ = setup
    recipe = QuantRecipe(act_rules=[(".*", QuantSpec())], act_mode="static")
    with pytest.raises(
        ValueError,
        match=r"ema_decay must be in \[0, 1\), got ema_decay=" + re.escape(repr(ema_decay)),
    ):
        calibrate_activations(model, variables, batches, recipe, method="ema", ema_decay=ema_decay)
