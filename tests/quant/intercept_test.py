import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import QuantSpec
from kdq.quant.intercept import activation_interceptor, activation_report
from kdq.quant.recipe import QuantRecipe


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(6, name="inner")(x))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Block(name="block")(x)
        x = nn.Dense(5, name="mid")(x)
        return nn.Dense(3, name="head")(nn.relu(x))


def _numpy_fake_quant(x, bits, scale=None):
    qmax = 2 ** (bits - 1) - 1
    if scale is None:
        scale = np.abs(x).max() / qmax
    return np.clip(np.round(x / scale), -qmax - 1, qmax) * scale


@pytest.fixture
def net():
    model = Net()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 7))
    return model, model.init(jax.random.PRNGKey(1), x), x


def _numpy_forward(params, x, quantize):
    """The Net forward in numpy; `quantize(name, input)` transforms each Dense input."""

    def dense(name, p, h):
        return quantize(name, h) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])

    h = np.maximum(dense("block/inner", params["block"]["inner"], np.asarray(x)), 0)
    h = dense("mid", params["mid"], h)
    return dense("head", params["head"], np.maximum(h, 0))


def test_only_selected_modules_get_quantized_inputs(net):
    model, variables, x = net
    recipe = QuantRecipe(act_rules=[("head", None), (".*", QuantSpec(bits=4))])
    report = activation_report(model, variables, x, rules=recipe.act_rules)
    assert report == {"block/inner": QuantSpec(bits=4), "mid": QuantSpec(bits=4), "head": None}

    def run(x):
        with nn.intercept_methods(activation_interceptor(recipe)):
            return model.apply(variables, x)

    expected = _numpy_forward(
        variables["params"],
        x,
        lambda name, h: h if name == "head" else _numpy_fake_quant(h, 4).astype(np.float32),
    )
    np.testing.assert_allclose(jax.jit(run)(x), expected, rtol=1e-5, atol=1e-5)


def test_static_ranges_are_fixed_and_dynamic_follow_the_batch(net):
    model, variables, x = net
    spec = QuantSpec(bits=8)
    static = QuantRecipe(act_rules=[("mid", spec)], act_mode="static")
    dynamic = QuantRecipe(act_rules=[("mid", spec)], act_mode="dynamic")
    state = {"mid": {"scale": jnp.float32(0.01)}}

    def run(recipe, x, state=None):
        with nn.intercept_methods(activation_interceptor(recipe, state)):
            return model.apply(variables, x)

    for factor in (1.0, 10.0):
        xs = x * factor
        expected_static = _numpy_forward(
            variables["params"],
            xs,
            lambda name, h: _numpy_fake_quant(h, 8, scale=np.float32(0.01)) if name == "mid" else h,
        )
        expected_dynamic = _numpy_forward(
            variables["params"],
            xs,
            lambda name, h: _numpy_fake_quant(h, 8) if name == "mid" else h,
        )
        np.testing.assert_allclose(run(static, xs, state), expected_static, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(run(dynamic, xs), expected_dynamic, rtol=1e-4, atol=1e-4)


def test_static_mode_without_state_names_the_module(net):
    model, variables, x = net
    recipe = QuantRecipe(act_rules=[("mid", QuantSpec())], act_mode="static")
    with pytest.raises(ValueError, match="no static activation state for module 'mid'"):
        with nn.intercept_methods(activation_interceptor(recipe, {})):
            model.apply(variables, x)


def test_rules_that_select_nothing_list_the_module_paths(net):
    model, variables, x = net
    with pytest.raises(ValueError, match=r"select no Dense.*\['block/inner', 'head', 'mid'\]"):
        activation_report(model, variables, x, rules=[("Conv_.*", QuantSpec())])


def test_a_rule_selecting_only_an_unsupported_module_is_an_error(net):
    model, variables, x = net
    with pytest.raises(
        ValueError, match=r"selects \['block \(Block\)'\].*select the layers inside"
    ):
        activation_report(model, variables, x, rules=[("block", QuantSpec()), ("mid", QuantSpec())])


def test_none_rules_keep_everything_float_and_are_reported(net):
    model, variables, x = net
    report = activation_report(
        model, variables, x, rules=[("head", None), (".*", QuantSpec(bits=8))]
    )
    assert report["head"] is None
    assert sorted(path for path, spec in report.items() if spec is not None) == [
        "block/inner",
        "mid",
    ]


def test_lsq_and_pact_steps_receive_gradients(net):
    model, variables, x = net
    spec = QuantSpec(bits=4, signed=False)
    for mode, field in (("lsq", "log_step"), ("pact", "log_alpha")):
        recipe = QuantRecipe(act_rules=[("head", spec)], act_mode=mode)

        def loss(state, recipe=recipe):
            with nn.intercept_methods(activation_interceptor(recipe, state)):
                return jnp.sum(model.apply(variables, x) ** 2)

        grads = jax.grad(loss)({"head": {field: jnp.log(jnp.float32(0.05))}})
        assert float(grads["head"][field]) != 0.0
