"""Integer-path exactness bounds (int32, GPU float32) and per-row dynamic activation scales."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import QuantSpec, quantize
from kdq.quant import integer as integer_lib
from kdq.quant.integer import QuantizedModel, fake_quant_apply, integer_apply, to_quantized_model
from kdq.quant.recipe import QuantRecipe

EPS = float(np.finfo(np.float32).eps)


def _static_qmodel(params, act_spec, weight_spec, act_scale):
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", weight_spec)], act_rules=[(".*", act_spec)], act_mode="static"
    )
    path = "Conv_0" if "Conv_0" in params else "Dense_0"
    return to_quantized_model(
        params, recipe, {"activations": {path: {"scale": np.float32(act_scale)}}}
    )


# ------------------------------------------------------------------ int32 accumulator


@pytest.mark.parametrize(
    "act_spec,weight_spec,largest_k",
    [
        # |q_x| <= 2^15, |q_w| <= 2^15: one product is 2^30, two reach 2^31 > 2^31 - 1
        (QuantSpec(bits=16), QuantSpec(bits=16), 1),
        # 4095 * 2048 = 8386560 per product: floor((2^31 - 1) / 8386560) = 256 terms
        (QuantSpec(bits=12, signed=False), QuantSpec(bits=12), 256),
    ],
    ids=["16x16", "u12x12"],
)
def test_int32_overflow_is_refused_exactly_beyond_the_closed_form_bound(
    act_spec, weight_spec, largest_k
):
    m_x, m_w = max(-act_spec.qmin, act_spec.qmax), max(-weight_spec.qmin, weight_spec.qmax)
    assert largest_k * m_x * m_w <= 2**31 - 1 < (largest_k + 1) * m_x * m_w
    wrapped = _Wrap()
    for k in (largest_k, largest_k + 1):
        params = {
            "Dense_0": {
                "kernel": jnp.full((k, 2), -1.0, jnp.float32),
                "bias": jnp.zeros((2,), jnp.float32),
            }
        }
        qmodel = _static_qmodel(params, act_spec, weight_spec, 1.0)
        # Worst case: every input at the largest level, every weight at -2^(b-1) or -qmax.
        x = np.full((3, k), act_spec.qmin if act_spec.signed else act_spec.qmax, np.float32)
        if k == largest_k:
            y = np.asarray(integer_apply(wrapped, qmodel, x))
            q_w = np.asarray(qmodel.params["Dense_0"]["kernel"].qvalue, np.int64)
            s_w = np.asarray(qmodel.params["Dense_0"]["kernel"].scale, np.float64).reshape(-1)
            exact = (x.astype(np.int64) @ q_w) * s_w
            np.testing.assert_allclose(y, exact, rtol=4 * EPS)
            assert np.abs(x.astype(np.int64) @ q_w).max() > 2**29  # near the int32 limit
        else:
            with pytest.raises(
                ValueError,
                match=rf"module 'Dense_0': its int32 accumulator can overflow: K={k} products",
            ):
                integer_apply(wrapped, qmodel, x)


class _Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="Dense_0")(x)


class _Conv(nn.Module):
    features: int = 2
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        return nn.Conv(
            self.features, (3, 3), padding="VALID", feature_group_count=self.groups, name="Conv_0"
        )(x)


# --------------------------------------------------------------- GPU float32 bound


def test_float32_convolutions_are_split_into_exact_slices(monkeypatch):
    """int8 x int8: 2^24 // (128 * 128) = 1024 exact terms; K = 9 * 121 = 1089 needs two slices.

    All products are 127 * 127 = 16129 (odd), so the sum 1089 * 16129 = 17564481 exceeds
    2^24 and is odd: no float32 holds it, a single float32 accumulation cannot be exact.
    """
    cin = 121
    params = {
        "Conv_0": {
            "kernel": jnp.full((3, 3, cin, 2), -1.0, jnp.float32),
            "bias": jnp.zeros((2,), jnp.float32),
        }
    }
    model = _Conv()
    qmodel = _static_qmodel(params, QuantSpec(bits=8), QuantSpec(bits=8, axes=(-1,)), 1.0)
    x = np.full((1, 3, 3, cin), -127.0, np.float32)
    expected = 9 * cin * 127 * 127
    assert expected > 2**24 and expected % 2 == 1
    cpu = np.asarray(integer_apply(model, qmodel, x))
    monkeypatch.setattr(integer_lib, "_float_convolutions", lambda: True)
    assert (
        integer_lib._channels_per_slice(model, qmodel.params["Conv_0"]["kernel"], QuantSpec())
        == 113
    )
    gpu_path = np.asarray(jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x))
    scale = float(np.asarray(qmodel.params["Conv_0"]["kernel"].scale).reshape(-1)[0])
    np.testing.assert_array_equal(gpu_path, cpu)
    np.testing.assert_allclose(gpu_path, expected * scale, rtol=2 * EPS)


def test_float32_bound_refusals_name_the_layer(monkeypatch):
    monkeypatch.setattr(integer_lib, "_float_convolutions", lambda: True)
    wide = QuantSpec(bits=16)  # 2^15 * 2^7 = 2^22 per product: 4 exact terms < one 3x3 window
    for groups, reason in ((1, "even one input channel's 9 products"), (2, "grouped convolution")):
        cin = 2
        params = {
            "Conv_0": {
                "kernel": jnp.ones((3, 3, cin // groups, 2), jnp.float32),
                "bias": jnp.zeros((2,), jnp.float32),
            }
        }
        model = _Conv(groups=groups)
        qmodel = _static_qmodel(params, wide, QuantSpec(bits=8, axes=(-1,)), 1.0)
        with pytest.raises(ValueError, match=rf"module 'Conv_0': the GPU float32.*{reason}"):
            integer_apply(model, qmodel, np.ones((1, 3, 3, cin), np.float32))


# ------------------------------------------------------ per-row dynamic activations


class _Tokens(nn.Module):
    """A dense layer on (B, T, D) inputs, as in a transformer block."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="Dense_0")(x)


@pytest.mark.parametrize(
    "shape,axes",
    [((6, 16), (0,)), ((3, 4, 16), (0, 1)), ((3, 4, 16), (0,))],
    ids=["rows", "tokens", "examples"],
)
def test_per_row_dynamic_scales_rescale_the_accumulator(shape, axes):
    rng = np.random.default_rng(len(shape) + len(axes))
    # Rows of very different magnitudes: a per-tensor scale would lose the small ones.
    x = (rng.normal(size=shape) * 10.0 ** rng.integers(-2, 3, size=shape[:-1] + (1,))).astype(
        np.float32
    )
    model = _Tokens()
    variables = model.init(jax.random.PRNGKey(0), x)
    spec = QuantSpec(bits=8, axes=axes)
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=8, axes=(-1,)))],
        act_rules=[(".*", spec)],
        act_mode="dynamic",
    )
    qmodel = to_quantized_model(variables["params"], recipe)
    y_int = np.asarray(jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x))
    y_fq = np.asarray(fake_quant_apply(model, qmodel, x))
    # numpy reference: one scale per row over the reduced axes, max |x| / 127.
    reduce = tuple(i for i in range(x.ndim) if i not in axes)
    s_x = (np.abs(x).max(axis=reduce, keepdims=True) / np.float32(127)).astype(np.float32)
    q_x = np.clip(np.round(x / s_x), -128, 127).astype(np.int64)
    kernel = qmodel.params["Dense_0"]["kernel"]
    q_w = np.asarray(kernel.qvalue, np.int64)
    s_w = np.asarray(kernel.scale, np.float64).reshape(-1)
    bias = np.asarray(qmodel.params["Dense_0"]["bias"], np.float64)
    exact = (q_x @ q_w) * (s_x.astype(np.float64) * s_w) + bias
    magnitude = (np.abs(q_x) * s_x.astype(np.float64)) @ (np.abs(q_w) * s_w)
    bound = (shape[-1] + 3) * EPS * magnitude + 4 * EPS * np.abs(exact) + EPS * np.abs(bias)
    assert np.all(np.abs(y_int - exact) <= bound)
    assert np.all(np.abs(y_fq - exact) <= bound)


def test_per_example_scales_of_a_convolution(monkeypatch):
    x = np.random.default_rng(0).normal(size=(3, 5, 5, 2)).astype(np.float32)
    x *= np.array([0.01, 1.0, 100.0], np.float32).reshape(3, 1, 1, 1)
    model = _Conv()
    variables = model.init(jax.random.PRNGKey(0), x)
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=8, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=8, axes=(0,)))],
        act_mode="dynamic",
    )
    qmodel = to_quantized_model(variables["params"], recipe)
    kernel = qmodel.params["Conv_0"]["kernel"]
    q_w = np.asarray(kernel.qvalue, np.int64)
    s_w = np.asarray(kernel.scale, np.float64).reshape(-1)
    for float_convs in (False, True):
        monkeypatch.setattr(integer_lib, "_float_convolutions", lambda f=float_convs: f)
        y = np.asarray(integer_apply(model, qmodel, x))
        for b in range(3):
            q = quantize(x[b : b + 1], QuantSpec(bits=8))
            q_x = np.asarray(q.qvalue, np.int64)[0]
            patches = np.stack(
                [q_x[i : i + 3, j : j + 3].reshape(-1) for i in range(3) for j in range(3)]
            )
            acc = patches @ q_w.reshape(-1, 2)
            expected = acc * (float(q.scale.reshape(())) * s_w) + np.asarray(
                qmodel.params["Conv_0"]["bias"]
            )
            np.testing.assert_allclose(
                y[b].reshape(-1, 2), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max()
            )


@pytest.mark.parametrize(
    "model,shape,spec,match",
    [
        (_Tokens(), (3, 4, 16), QuantSpec(axes=(-1,)), r"axes \(2,\) of the \(3, 4, 16\) input"),
        (_Tokens(), (3, 16), QuantSpec(axes=(0,), group_size=4), r"per-group activation"),
        (_Conv(), (2, 5, 5, 2), QuantSpec(axes=(0, 1, 2)), r"axes \(1, 2\) of the"),
    ],
    ids=["contraction", "groups", "conv_pixels"],
)
def test_activation_scales_on_the_contraction_are_refused(model, shape, spec, match):
    x = np.ones(shape, np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=8, axes=(-1,)))],
        act_rules=[(".*", spec)],
        act_mode="dynamic",
    )
    qmodel = to_quantized_model(variables["params"], recipe)
    assert isinstance(qmodel, QuantizedModel)
    with pytest.raises(ValueError, match=match):
        integer_apply(model, qmodel, x)
