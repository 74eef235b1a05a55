import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.models import count_params, create_model


def _dense_params(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _conv_params(k: int, c_in: int, c_out: int) -> int:
    return k * k * c_in * c_out + c_out


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("mlp", {"hidden": (32,)}, _dense_params(64, 32) + _dense_params(32, 10)),
        (
            "mlp",
            {"hidden": (64, 16)},
            _dense_params(64, 64) + _dense_params(64, 16) + _dense_params(16, 10),
        ),
        (
            "cnn",
            {"channels": (32, 64), "dense": 128},
            _conv_params(3, 1, 32)
            + _conv_params(3, 32, 64)
            + _dense_params(2 * 2 * 64, 128)
            + _dense_params(128, 10),
        ),
    ],
)
def test_parameter_count_matches_the_architecture(name, options, expected):
    model = create_model(name, num_classes=10, **options)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    assert count_params(params) == expected


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_logits_shape(name):
    model = create_model(name, num_classes=7)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    assert model.apply(variables, jnp.ones((5, 28, 28, 1))).shape == (5, 7)


def test_unknown_model_name_lists_known_models():
    with pytest.raises(
        ValueError, match=r"unknown model name='resnet9000'.*'cnn', 'encoder_small'"
    ):
        create_model("resnet9000", num_classes=10)


def test_unknown_model_option_lists_options():
    with pytest.raises(ValueError, match=r"no option\(s\) \['depth'\].*hidden"):
        create_model("mlp", num_classes=10, depth=3)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
    model = create_model(name, num_classes=10, dtype="bfloat16")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    hlo = jax.jit(model.apply).lower(variables, jnp.ones((2, 8, 8, 1))).as_text()
    assert "bf16" in hlo
    logits = model.apply(variables, jnp.ones((2, 8, 8, 1)))
    reference = create_model(name, num_classes=10).apply(variables, jnp.ones((2, 8, 8, 1)))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, rtol=0.05, atol=0.05)
