import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.data import eval_batches, load_dataset
from kdq.models import create_model
from kdq.quant import QuantSpec, dequantize
from kdq.quant.integer import QuantizedModel, fake_quant_apply, integer_apply, to_quantized_model
from kdq.quant.ptq import ptq
from kdq.quant.recipe import QuantRecipe

EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def digits():
    dataset = load_dataset("digits")
    train = [
        b["image"] for b in eval_batches(dataset.train, batch_size=128, features=dataset.features)
    ]
    test = list(eval_batches(dataset.test, batch_size=128, features=dataset.features))
    return train[:3], test


def _recipe(weight_bits, act_bits=8):
    return QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=weight_bits, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=act_bits))],
        act_mode="static",
    )


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_one_dense_layer_agrees_within_the_documented_bound(weight_bits):
    model = create_model("mlp", num_classes=16, hidden=())
    rng = np.random.default_rng(weight_bits)
    x = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    qmodel = ptq(model, variables, [x], _recipe(weight_bits))
    y_int = np.asarray(jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x))
    y_fq = np.asarray(jax.jit(lambda q, x: fake_quant_apply(model, q, x))(qmodel, x))
    # Independent reference: exact integer products, then the rescale.
    kernel = qmodel.params["Dense_0"]["kernel"]
    s_x = float(qmodel.act_scales["Dense_0"]["scale"])
    q_x = np.clip(np.round(x.reshape(32, -1) / np.float32(s_x)), -128, 127).astype(np.int64)
    q_w = np.asarray(kernel.qvalue).astype(np.int64)
    s_w = np.asarray(kernel.scale).reshape(-1)
    bias = np.asarray(qmodel.params["Dense_0"]["bias"])
    exact = (q_x @ q_w).astype(np.float64) * (np.float64(s_x) * s_w) + bias
    k = q_w.shape[0]
    magnitude = np.abs(q_x * s_x) @ np.abs(np.asarray(dequantize(kernel)))
    bound = (k + 3) * EPS * magnitude + 4 * EPS * np.abs(exact)
    assert np.all(np.abs(y_int - exact) <= 4 * EPS * np.abs(exact) + EPS * np.abs(bias))
    assert np.all(np.abs(y_int - y_fq) <= bound)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("weight_bits", [8, 4])
def test_model_predictions_identical_on_the_digits_test_set(digits, name, weight_bits):
    calibration, test = digits
    model = create_model(name, num_classes=10)
    variables = model.init(jax.random.PRNGKey(0), calibration[0])
    qmodel = ptq(model, variables, calibration, _recipe(weight_bits))
    int_fn = jax.jit(lambda q, x: integer_apply(model, q, x))
    fq_fn = jax.jit(lambda q, x: fake_quant_apply(model, q, x))
    # Documented bound for a whole network: a float difference upstream can move
    # an input of the last layer by at most one quantization step s_x, so each
    # logit moves by at most s_x * sum_k |w_hat[k, n]| (plus rounding).
    last = qmodel.params["Dense_1"]["kernel"]
    step = float(qmodel.act_scales["Dense_1"]["scale"])
    one_step = step * np.abs(np.asarray(dequantize(last))).sum(0) + 1e-5
    close = 0
    for batch in test:
        y_int = np.asarray(int_fn(qmodel, batch["image"]))[batch["mask"]]
        y_fq = np.asarray(fq_fn(qmodel, batch["image"]))[batch["mask"]]
        np.testing.assert_array_equal(y_int.argmax(-1), y_fq.argmax(-1))
        assert np.all(np.abs(y_int - y_fq) <= one_step)
        close += np.sum(np.all(np.abs(y_int - y_fq) <= 1e-5 * (1 + np.abs(y_fq)), axis=-1))
    assert close >= 0.9 * sum(int(b["mask"].sum()) for b in test)


def test_integer_path_runs_integer_dot_products(digits):
    calibration, _ = digits
    model = create_model("cnn", num_classes=10)
    variables = model.init(jax.random.PRNGKey(0), calibration[0])
    qmodel = ptq(model, variables, calibration, _recipe(4))
    hlo = jax.jit(lambda q, x: integer_apply(model, q, x)).lower(qmodel, calibration[0]).as_text()
    ops = [line for line in hlo.splitlines() if "dot_general" in line or "convolution" in line]
    assert len(ops) == 4  # two convolutions, two dense layers
    for line in ops:
        operands, result = line.rsplit("->", 1)
        if jax.default_backend() == "gpu" and "convolution" in line:
            # GPU convolutions run on exact float32 integer values (see integer.py).
            assert operands.count("xf32>") == 2 and "xf32>" in result, line
        else:
            assert operands.count("xi8>") == 2 and "xi32>" in result, line


def test_weights_are_stored_as_int4_and_int8(digits):
    calibration, _ = digits
    model = create_model("mlp", num_classes=10)
    variables = model.init(jax.random.PRNGKey(0), calibration[0])
    for bits, dtype in ((4, jnp.int4), (8, jnp.int8)):
        qmodel = to_quantized_model(variables["params"], _recipe(bits))
        assert isinstance(qmodel, QuantizedModel)
        assert qmodel.params["Dense_0"]["kernel"].qvalue.dtype == dtype
        assert qmodel.params["Dense_0"]["bias"].dtype == jnp.float32


def test_unsupported_recipes_are_named(digits):
    calibration, _ = digits
    model = create_model("mlp", num_classes=10)
    variables = model.init(jax.random.PRNGKey(0), calibration[0])
    # Groups of one scale along the output axis (axes=()) do not factor out of the sum.
    grouped = QuantRecipe(
        weight_rules=[("Dense_0/kernel", QuantSpec(bits=4, group_size=16))],
        act_rules=[(".*", QuantSpec(bits=8))],
        act_mode="static",
    )
    qmodel = ptq(model, variables, calibration, grouped)
    with pytest.raises(
        ValueError,
        match=r"does not support weight groups along kernel axis 1 .*\(module 'Dense_0'\)",
    ):
        integer_apply(model, qmodel, calibration[0])
    affine = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=8))],
        act_rules=[(".*", QuantSpec(bits=8, symmetric=False))],
        act_mode="static",
    )
    qmodel = ptq(model, variables, calibration, affine)
    with pytest.raises(ValueError, match=r"does not support zero points"):
        integer_apply(model, qmodel, calibration[0])


def test_ptq_refuses_learned_modes(digits):
    calibration, _ = digits
    model = create_model("mlp", num_classes=10)
    variables = model.init(jax.random.PRNGKey(0), calibration[0])
    recipe = QuantRecipe(act_rules=[(".*", QuantSpec(signed=False))], act_mode="lsq")
    with pytest.raises(ValueError, match=r"act_mode in \('dynamic', 'static'\), got .*'lsq'"):
        ptq(model, variables, calibration, recipe)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet8"])
def test_batchnorm_models_with_explicit_padding_and_depthwise_convs(name):
    """BN runs in float after the integer conv; depthwise and explicitly padded convs work."""
    model = create_model(name, num_classes=10)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=8, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=8))],
        act_mode="static",
    )
    qmodel = ptq(model, variables, [x], recipe)
    assert "batch_stats" in qmodel.model_state
    y_int = np.asarray(jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x))
    y_fq = np.asarray(jax.jit(lambda q, x: fake_quant_apply(model, q, x))(qmodel, x))
    np.testing.assert_array_equal(y_int.argmax(-1), y_fq.argmax(-1))
    np.testing.assert_allclose(y_int, y_fq, rtol=1e-3, atol=1e-3 * np.abs(y_fq).max())
