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
