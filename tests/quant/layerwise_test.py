"""Rotations, SmoothQuant / AWQ scales, input statistics and layer-by-layer PTQ.

References: numpy (Gram matrices of captured inputs, Hadamard identities,
closed-form scales, output errors computed from the rows), and the float
model for function preservation.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq import checkpoint
from kdq import quant as q
from kdq.models import create_model
from kdq.quant.awq import awq_scales
from kdq.quant.input_statistics import collect_input_statistics
from kdq.quant.rotation import (
    hadamard_matrix,
    hadamard_signs,
    rotate,
    rotate_weight,
    rotation_matrix,
)
from kdq.quant.smoothquant import smoothquant_scales
from kdq.quant.transforms import transform_interceptor, transform_kernel

W4G32 = q.QuantSpec(bits=4, axes=(-1,), group_size=32)
BLOCKS = r"block_\d+/.*/kernel"


@pytest.mark.parametrize("n", [1, 2, 12, 20, 44, 64, 384, 1536])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n).astype(np.int64)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_unsupported_hadamard_order_is_refused():
    with pytest.raises(ValueError, match="no Hadamard matrix of order 52"):
        hadamard_matrix(52)  # 4 * 13: no Paley order 13 or 26
    with pytest.raises(ValueError, match="int >= 1"):
        hadamard_matrix(0)


@pytest.mark.parametrize("k", [64, 384])
def test_rotation_preserves_the_layer_and_spreads_outliers(k):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(5, k)).astype(np.float32), rng.normal(size=(k, 7))
    signs = hadamard_signs(k, seed=3)
    rotated = np.asarray(rotate(jnp.asarray(x), jnp.asarray(signs)), np.float64)
    np.testing.assert_allclose(rotated @ rotate_weight(w, signs), x @ w, atol=1e-4, rtol=1e-5)
    # e_1 R has every entry of magnitude 1/sqrt(k).
    spike = np.zeros((1, k), np.float32)
    spike[0, 0] = 1.0
    out = np.asarray(rotate(jnp.asarray(spike), jnp.asarray(signs)))
    np.testing.assert_allclose(np.abs(out), 1 / math.sqrt(k), rtol=1e-6)
    assert not np.array_equal(signs, hadamard_signs(k, seed=4))


def test_smoothquant_scales_closed_form():
    act = np.array([4.0, 1.0, 0.0])
    w = np.array([[1.0, -0.25], [0.5, 0.1], [2.0, 1.0]])
    np.testing.assert_allclose(smoothquant_scales(act, w, 0.5), [2.0, math.sqrt(2.0), 1.0])
    np.testing.assert_allclose(smoothquant_scales(act, w, 1.0), [4.0, 1.0, 1.0])
    np.testing.assert_allclose(smoothquant_scales(act, w, 0.0), [1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(act, w, 1.5)
    with pytest.raises(ValueError, match="finite"):
        smoothquant_scales(np.array([np.nan, 1.0, 1.0]), w)


def _outlier_rows(rng, rows, k, outliers=4, factor=50.0):
    x = rng.normal(size=(rows, k))
    x[:, :outliers] *= factor
    return x


def test_smoothquant_lowers_w8a8_error_with_outlier_channels():
    rng = np.random.default_rng(1)
    x, w = _outlier_rows(rng, 256, 64), rng.normal(size=(64, 32)) * 0.1
    act, wt = q.QuantSpec(bits=8, axes=(0,)), q.QuantSpec(bits=8, axes=(-1,))

    def w8a8_error(scales):
        xs = jnp.asarray(x / scales, jnp.float32)
        ws = jnp.asarray(scales[:, None] * w, jnp.float32)
        y = np.asarray(q.fake_quant(xs, act), np.float64) @ np.asarray(q.fake_quant(ws, wt))
        return np.mean((y - x @ w) ** 2)

    scales = smoothquant_scales(np.abs(x).max(axis=0), w, 0.5)
    np.testing.assert_allclose((x / scales) @ (scales[:, None] * w), x @ w, rtol=1e-10)
    assert w8a8_error(scales) < 0.5 * w8a8_error(np.ones(64))


@pytest.mark.parametrize("spec", [W4G32, q.QuantSpec(bits=3, axes=(-1,))])
def test_awq_beats_rtn_on_outlier_channels(spec):
    rng = np.random.default_rng(2)
    train, held_out = _outlier_rows(rng, 512, 64), _outlier_rows(rng, 512, 64)
    w = rng.normal(size=(64, 48))
    hessian = train.T @ train / len(train)
    result = awq_scales(w, hessian, np.abs(train).mean(axis=0), spec)
    s = result.scales
    awq_w = np.asarray(q.fake_quant(jnp.asarray(s[:, None] * w, jnp.float32), spec)) / s[:, None]
    rtn_w = np.asarray(q.fake_quant(jnp.asarray(w, jnp.float32), spec))
    # The Hessian form of the error equals the rows' squared output error.
    direct = np.mean(np.sum((train @ awq_w - train @ w) ** 2, axis=1))
    np.testing.assert_allclose(result.error, direct, rtol=1e-4)
    assert result.error <= result.rtn_error
    held = [np.mean((held_out @ m - held_out @ w) ** 2) for m in (awq_w, rtn_w)]
    assert held[0] < held[1]


def test_awq_refuses_bad_statistics():
    w, h = np.ones((4, 2)), np.eye(4)
    with pytest.raises(ValueError, match="grid"):
        awq_scales(w, h, np.ones(4), W4G32, grid=0)
    with pytest.raises(ValueError, match="finite"):
        awq_scales(w, h, np.array([1, np.nan, 1, 1]), q.QuantSpec(bits=4, axes=(-1,)))
    with pytest.raises(ValueError, match=r"\(K, K\)"):
        awq_scales(w, np.eye(3), np.ones(4), q.QuantSpec(bits=4, axes=(-1,)))


def _inputs_of(model, variables, x, path):
    """The input array of module `path`'s (single) call, captured by an interceptor."""
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and "/".join(context.module.path) == path:
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, x)
    assert len(seen) == 1
    return seen[0]


@pytest.fixture(scope="module")
def lm():
    model = create_model(
        "transformer_lm",
        num_classes=256,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=128,
        max_len=64,
    )
    batches = [jax.random.randint(jax.random.PRNGKey(i), (4, 32), 0, 256) for i in range(3)]
    variables = model.init(jax.random.PRNGKey(7), batches[0])
    return model, variables, batches


def test_input_statistics_equal_numpy_of_the_captured_inputs(lm):
    model, variables, batches = lm
    paths = {"block_0/attn/q", "block_1/mlp/down"}
    stats = collect_input_statistics(
        lambda x, mutable: model.apply(variables, x, mutable=mutable), batches, paths
    )
    for path in paths:
        rows = []
        for x in batches:
            captured = _inputs_of(model, variables, x, path)
            rows.append(np.asarray(captured, np.float64).reshape(-1, captured.shape[-1]))
        rows = np.concatenate(rows)
        np.testing.assert_allclose(stats[path].gram, rows.T @ rows, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(stats[path].abs_max, np.abs(rows).max(axis=0), rtol=1e-6)
        assert stats[path].rows == len(rows)


def test_transforms_preserve_the_float_model(lm):
    model, variables, batches = lm
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    transforms = {}
    rng = np.random.default_rng(0)
    for block in ("block_0", "block_1"):
        for layer, width in (("attn/q", 64), ("attn/o", 64), ("mlp/down", 128)):
            entry = {
                "rotation_signs": hadamard_signs(width, seed=len(transforms)),
                "smoothing": rng.uniform(0.2, 5.0, width).astype(np.float32),
            }
            node = params[block]
            for part in layer.split("/"):
                node = node[part]
            node["kernel"] = transform_kernel(node["kernel"], entry).astype(np.float32)
            transforms.setdefault(block, {}).setdefault(layer.split("/")[0], {})[
                layer.split("/")[1]
            ] = entry
    with jax.default_matmul_precision("highest"):
        reference = model.apply(variables, batches[0])
        with nn.intercept_methods(transform_interceptor(transforms)):
            transformed = model.apply({"params": params}, batches[0])
    np.testing.assert_allclose(transformed, reference, atol=1e-5)


def test_layerwise_ptq_gptq_and_awq_beat_rtn_and_integer_path_agrees(lm, tmp_path):
    model, variables, batches = lm
    recipe = q.QuantRecipe(weight_rules=((BLOCKS, q.QuantSpec(bits=3, axes=(-1,))),))
    reference = model.apply(variables, batches[0])
    errors, layer_errors = {}, {}
    for method in (q.PTQMethod(), q.PTQMethod(weights="gptq"), q.PTQMethod(scaling="awq")):
        qmodel, results = q.layerwise_ptq(model, variables, batches, recipe, method, progress=False)
        assert [r.path for r in results][:4] == [f"block_0/attn/{n}" for n in "qkvo"]
        out = q.fake_quant_apply(model, qmodel, batches[0])
        errors[method.name] = float(jnp.mean((out - reference) ** 2))
        layer_errors[method.name] = [r.relative_error for r in results[:4]]
        # Weight-only integer path: weights dequantized on the fly, same function.
        np.testing.assert_allclose(q.integer_apply(model, qmodel, batches[0]), out, atol=2e-5)
    assert errors["gptq"] < errors["rtn"]
    # The first stage (block_0/attn) sees the same float inputs under every
    # method, so AWQ's search (which contains s = 1) cannot do worse there.
    assert all(a <= r for a, r in zip(layer_errors["awq+rtn"], layer_errors["rtn"], strict=True))
    assert all(g < r for g, r in zip(layer_errors["gptq"], layer_errors["rtn"], strict=True))


def test_rotated_smoothed_model_saves_restores_and_runs_w8a8(lm, tmp_path):
    model, variables, batches = lm
    recipe = q.QuantRecipe(
        weight_rules=((BLOCKS, q.QuantSpec(bits=8, axes=(-1,))),),
        act_rules=((r"block_\d+/.*", q.QuantSpec(bits=8, axes=(0, 1))),),
        act_mode="dynamic",
    )
    method = q.PTQMethod(scaling="smoothquant", rotate=True)
    qmodel = q.ptq(model, variables, batches, recipe, method=method)
    assert set(qmodel.input_transforms["block_0"]["attn"]["q"]) == {"rotation_signs", "smoothing"}
    checkpoint.save_quantized(tmp_path / "q", qmodel)
    restored, _ = checkpoint.restore_quantized(tmp_path / "q")
    out = q.integer_apply(model, qmodel, batches[1])
    np.testing.assert_array_equal(q.integer_apply(model, restored, batches[1]), out)
    reference = model.apply(variables, batches[1])
    relative_rms = float(jnp.sqrt(jnp.mean((out - reference) ** 2) / jnp.mean(reference**2)))
    assert relative_rms < 0.05
    with pytest.raises(ValueError, match="input_transforms"):
        q.to_qat_state(qmodel)


def test_static_activations_are_calibrated_on_transformed_inputs(lm):
    model, variables, batches = lm
    recipe = q.QuantRecipe(
        weight_rules=((BLOCKS, q.QuantSpec(bits=8, axes=(-1,))),),
        act_rules=((r"block_\d+/attn/q", q.QuantSpec(bits=8)),),
        act_mode="static",
    )
    qmodel = q.ptq(model, variables, batches, recipe, method=q.PTQMethod(rotate=True))
    entry = qmodel.input_transforms["block_0"]["attn"]["q"]
    largest = 0.0
    for x in batches:
        captured = _inputs_of(model, variables, x, "block_0/attn/q")
        rotated = np.asarray(captured, np.float64) @ rotation_matrix(entry["rotation_signs"])
        largest = max(largest, float(np.max(np.abs(rotated))))
    scale = float(qmodel.act_scales["block_0"]["attn"]["q"]["scale"])
    np.testing.assert_allclose(scale, largest / 127, rtol=1e-5)


def test_layerwise_ptq_bad_input(lm):
    model, variables, batches = lm
    recipe = q.QuantRecipe(weight_rules=((BLOCKS, W4G32),))
    nan = [batches[0], jnp.full_like(batches[0], 0)]
    bad_variables = jax.tree_util.tree_map(lambda v: v, variables)
    bad_variables["params"]["embed"]["embedding"] = (
        bad_variables["params"]["embed"]["embedding"].at[0].set(jnp.nan)
    )
    with pytest.raises(ValueError, match="not finite .* calibration batch 1"):
        q.layerwise_ptq(model, bad_variables, nan, recipe, q.PTQMethod(), progress=False)
    none = q.QuantRecipe(weight_rules=((r"nothing/kernel", W4G32),))
    with pytest.raises(ValueError, match="match no leaf"):
        q.layerwise_ptq(model, variables, batches, none, q.PTQMethod(), progress=False)
    embedding = q.QuantRecipe(weight_rules=((r"embed/embedding", q.QuantSpec(bits=4)),))
    with pytest.raises(ValueError, match="select no Dense kernel"):
        q.layerwise_ptq(model, variables, batches, embedding, q.PTQMethod(), progress=False)
    odd = q.QuantRecipe(weight_rules=((BLOCKS, q.QuantSpec(bits=4, axes=(-1,), group_size=48)),))
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        q.layerwise_ptq(model, variables, batches, odd, q.PTQMethod(), progress=False)
    with pytest.raises(ValueError, match="one pass over the calibration batches"):
        q.layerwise_ptq(model, variables, iter(batches), recipe, q.PTQMethod(), progress=False)
    with pytest.raises(ValueError, match="SmoothQuant .* needs act_rules"):
        q.layerwise_ptq(
            model, variables, batches, recipe, q.PTQMethod(scaling="smoothquant"), progress=False
        )
    quantized = q.layerwise_ptq(model, variables, batches, recipe, q.PTQMethod(), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        q.layerwise_ptq(
            model, {"params": quantized[0].params}, batches, recipe, q.PTQMethod(), progress=False
        )
    with pytest.raises(ValueError, match="weights must be one of"):
        q.PTQMethod(weights="obq")
    # A function returning fresh iterators streams the batches, once per stage.
    streamed, _ = q.layerwise_ptq(
        model, variables, lambda: iter(batches), recipe, q.PTQMethod(), progress=False
    )
    np.testing.assert_array_equal(
        streamed.params["block_0"]["mlp"]["up"]["kernel"].qvalue,
        quantized[0].params["block_0"]["mlp"]["up"]["kernel"].qvalue,
    )
