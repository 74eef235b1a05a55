import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.distill.taps import apply_with_taps, module_paths


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(4, name="inner")(x))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Block(name="block")(x)
        x = nn.Dense(3, name="head")(x)
        return x


@pytest.fixture
def net():
    model = Net()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5))
    return model, model.init(jax.random.PRNGKey(1), x), x


def test_taps_return_the_submodule_outputs(net):
    model, variables, x = net
    out, features, updates = apply_with_taps(model, variables, x, taps=["block/inner", "block"])
    p = variables["params"]["block"]["inner"]
    inner = np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(features["block/inner"], inner, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features["block"], np.maximum(inner, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, model.apply(variables, x))
    assert updates == {}


def test_taps_work_under_jit_and_grad(net):
    model, variables, x = net

    def feature_norm(params):
        _, features, _ = apply_with_taps(model, {"params": params}, x, taps=["block"])
        return jnp.sum(features["block"] ** 2)

    grads = jax.jit(jax.grad(feature_norm))(variables["params"])
    assert np.any(np.asarray(grads["block"]["inner"]["kernel"]) != 0)
    np.testing.assert_array_equal(grads["head"]["kernel"], 0)


def test_module_paths_lists_every_submodule(net):
    model, variables, x = net
    assert set(module_paths(model, variables, x)) == {"block", "block/inner", "head"}


def test_tap_matching_nothing_lists_paths(net):
    model, variables, x = net
    with pytest.raises(ValueError, match=r"'block/nope' must match exactly one.*block/inner"):
        apply_with_taps(model, variables, x, taps=["block/nope"])


def test_tap_matching_several_modules_is_an_error(net):
    model, variables, x = net
    with pytest.raises(ValueError, match=r"matched \['block', 'block/inner'\]"):
        apply_with_taps(model, variables, x, taps=["block.*"])


def test_invalid_tap_regex(net):
    model, variables, x = net
    with pytest.raises(ValueError, match=r"taps\[1\] regex '\(' is invalid"):
        apply_with_taps(model, variables, x, taps=["head", "("])


def test_taps_matching_the_same_submodule_each_capture_it(net):
    model, variables, x = net
    _, features, _ = apply_with_taps(model, variables, x, taps=["head", "h.*d", "block"])
    assert sorted(features) == ["block", "h.*d", "head"]
    np.testing.assert_array_equal(features["head"], model.apply(variables, x))
    np.testing.assert_array_equal(features["h.*d"], features["head"])
