"""Qwix's post-training quantization of a tiny kdq LM, against references written here.

The references, in numpy: Qwix's weight grid (s = max|w| / (qmax + 1/2),
round half to even, saturating; float32 as XLA evaluates it), compared with
kdq's `fake_quant` and `fake_quant_tree`; per-token input quantization and
SmoothQuant's scales from the Dense inputs and outputs captured here; GPTQ's
and AWQ's layer errors from the float model's Dense inputs.
"""

from __future__ import annotations

import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from experiments.bench.ptq_qwix import qwix_ptq
from kdq.models import create_model
from kdq.quant import QuantSpec, fake_quant, fake_quant_tree

BLOCK_LAYERS = r"block_\d+/.*"  # the layers kdq's benchmark quantizes
CONFIGS = {
    "rtn_w8": dict(method="rtn", weight_bits=8, group_size=None, act_bits=None),
    "rtn_w8a8": dict(method="rtn", weight_bits=8, group_size=None, act_bits=8),
    "rtn_w4_g16": dict(method="rtn", weight_bits=4, group_size=16, act_bits=None),
    "gptq_w8": dict(method="gptq", weight_bits=8, group_size=None, act_bits=None),
    "awq_w8": dict(method="awq", weight_bits=8, group_size=None, act_bits=None),
    "smoothquant_w8a8": dict(method="smoothquant", weight_bits=8, group_size=None, act_bits=8),
}


@pytest.fixture(scope="module")
def lm():
    model = create_model(
        "lm_tiny",
        num_classes=256,
        d_model=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        mlp_dim=64,
        max_len=16,
    )
    batches = [jax.random.randint(jax.random.PRNGKey(i), (4, 16), 0, 256) for i in range(2)]
    variables = model.init(jax.random.PRNGKey(7), batches[0])
    return model, variables, batches


@pytest.fixture(scope="module")
def results(lm):
    model, variables, batches = lm
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = qwix_ptq(model, variables, batches, **CONFIGS[name])
        return cache[name]

    return get


def block_kernels(params) -> dict[str, np.ndarray]:
    """{module path: kernel (in, out)} of the Dense layers the benchmark quantizes."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return {
        path.rpartition("/")[0]: np.asarray(w)
        for path, w in flat.items()
        if path.endswith("/kernel") and re.fullmatch(BLOCK_LAYERS, path.rpartition("/")[0])
    }


def dense_inputs(model, variables, batches) -> dict[str, np.ndarray]:
    """{module path: (rows, in) float64 inputs of every Dense over all batches}."""
    found: dict[str, list[np.ndarray]] = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            x = np.asarray(args[0], np.float64)
            found.setdefault("/".join(context.module.path), []).append(x.reshape(-1, x.shape[-1]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        for batch in batches:
            model.apply(variables, batch)
    return {path: np.concatenate(rows) for path, rows in found.items()}


def qwix_grid_scale(w: np.ndarray, bits: int, group_size: int | None = None) -> np.ndarray:
    """max |w| per output channel (and group of input rows) / (qmax + 1/2), in float64."""
    rows = w.shape[0] if group_size is None else group_size
    absmax = np.abs(w.reshape(w.shape[0] // rows, rows, w.shape[1])).max(axis=1)
    return absmax.astype(np.float64) / (2 ** (bits - 1) - 0.5)


def xla_rtn(w: np.ndarray, bits: int, group_size: int | None = None):
    """(scale, levels) of Qwix's round to nearest as XLA evaluates it, in float32.

    XLA turns Qwix's divisions by the constant qmax + 1/2 and by the scale
    into multiplications by their float32 reciprocals, s = max|w| fl(1/(qmax + 1/2))
    and q = round(w fl(1/s)): the extreme of each group sits on a rounding
    tie at qmax + 1/2 steps, and those roundings decide its level.
    """
    w = np.asarray(w, np.float32)
    rows = w.shape[0] if group_size is None else group_size
    absmax = np.abs(w.reshape(w.shape[0] // rows, rows, w.shape[1])).max(axis=1)
    scale = absmax * np.float32(1 / (2 ** (bits - 1) - 0.5))
    inverse = np.repeat(np.float32(1) / scale, rows, axis=0)
    return scale, np.clip(np.round(w * inverse), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def qwix_scale(result, path: str) -> np.ndarray:
    """The weight scale Qwix stored for the kernel at `path`."""
    leaf = flax.traverse_util.flatten_dict(result.params, sep="/")[path + "/kernel"]
    return np.asarray(leaf.array.scale)


def qwix_kernel(result, path: str) -> np.ndarray:
    """The dequantized kernel Qwix runs at `path` (AWQ's divided by its scales)."""
    leaf = flax.traverse_util.flatten_dict(result.params, sep="/")[path + "/kernel"]
    kernel = np.asarray(qwix.dequantize(leaf.array))
    return kernel / np.asarray(leaf.awq_scale)[:, None] if hasattr(leaf, "awq_scale") else kernel


def with_kernels(params, kernels: dict[str, np.ndarray]):
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    flat |= {path + "/kernel": jnp.asarray(w) for path, w in kernels.items()}
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_only_the_block_dense_kernels_are_quantized(lm, results):
    model, variables, _ = lm
    result = results("rtn_w8")
    expected = sorted(block_kernels(variables["params"]))
    assert len(expected) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert list(result.quantized_layers) == expected
    np.testing.assert_array_equal(
        result.params["embed"]["embedding"], variables["params"]["embed"]["embedding"]
    )


def check_rtn_kernels(result, params, bits: int, group_size: int | None) -> dict:
    """Asserts Qwix's kernels are `xla_rtn`'s and kdq's fake_quant given Qwix's scales but
    at ties (there one step apart); returns {path: reference kernel}.
    """
    spec = QuantSpec(bits=bits, axes=(-1,), group_size=group_size)
    references = {}
    for path, w in block_kernels(params).items():
        scale, levels = xla_rtn(w, bits, group_size)
        np.testing.assert_array_equal(qwix_scale(result, path), scale)
        np.testing.assert_allclose(scale, qwix_grid_scale(w, bits, group_size), rtol=1.2e-7)
        rows = w.shape[0] // scale.shape[0]
        references[path] = levels * np.repeat(scale, rows, axis=0)
        np.testing.assert_array_equal(qwix_kernel(result, path), references[path])
        kdq = np.asarray(fake_quant(w, spec, scale=scale))
        steps = np.abs(w) / np.repeat(scale, rows, axis=0)
        differ = kdq != references[path]
        assert np.all(np.abs(steps[differ] - (2 ** (bits - 1) - 0.5)) < 1e-4)
        np.testing.assert_allclose(
            np.abs(kdq - references[path])[differ],
            np.repeat(scale, rows, axis=0)[differ],
            rtol=1e-6,
        )
    return references


def test_rtn_w8_is_kdq_rtn_on_qwix_grid(lm, results):
    """Same layers, same per-channel symmetric scheme; Qwix's scale is max|w| / 127.5.

    Qwix's weight-only path (dequantize, float matmul) gives the logits of
    the model holding the reference kernels up to float32 summation order.
    kdq's own RTN (s = max|w| / 127) differs from Qwix's by at most one kdq
    step per weight (each rounds to within half of its step of w, and Qwix's
    step is smaller), so its logits differ from Qwix's by at most about twice
    its own error against float.
    """
    model, variables, batches = lm
    result, tokens = results("rtn_w8"), batches[0]
    references = check_rtn_kernels(result, variables["params"], 8, None)
    expected = model.apply({"params": with_kernels(variables["params"], references)}, tokens)
    logits = result.apply(tokens)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * float(np.abs(logits).max()))

    spec = QuantSpec(bits=8, axes=(-1,))
    rtn = fake_quant_tree(variables["params"], [(r"block_\d+/.*kernel", spec)])
    kdq_rtn = block_kernels(rtn)
    for path, w in block_kernels(variables["params"]).items():
        step = np.abs(w).max(axis=0) / 127
        assert np.all(np.abs(qwix_kernel(result, path) - kdq_rtn[path]) <= step * (1 + 1e-6))
    float_logits = model.apply(variables, tokens)
    kdq_rtn_logits = model.apply({"params": rtn}, tokens)
    assert relative(kdq_rtn_logits, float_logits) < 0.1
    assert relative(logits, kdq_rtn_logits) <= 2 * relative(kdq_rtn_logits, float_logits)


def test_group_size_is_one_scale_per_group_of_input_rows(lm, results):
    _, variables, _ = lm
    result = results("rtn_w4_g16")
    check_rtn_kernels(result, variables["params"], 4, 16)
    for path, w in block_kernels(variables["params"]).items():
        assert qwix_scale(result, path).shape == (w.shape[0] // 16, w.shape[1])


def layer_io(result, tokens) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{path: (input, output)} of every block Dense of Qwix's model, run eagerly."""
    found = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if isinstance(context.module, nn.Dense) and path in result.quantized_layers:
            found[path] = (np.asarray(args[0]), np.asarray(out))
        return out

    with nn.intercept_methods(capture):
        result.inference.apply({"params": result.params}, tokens)
    return found


def token_quant(x: np.ndarray) -> np.ndarray:
    """x on Qwix's per-token int8 grid as XLA evaluates it (`xla_rtn` over each token's features)."""
    scale = np.abs(x).max(axis=-1, keepdims=True) * np.float32(1 / 127.5)
    return np.clip(np.round(x * (np.float32(1) / scale)), -128, 127) * scale


def test_rtn_w8a8_quantizes_each_tokens_input(lm, results):
    """Every block Dense computes fq_token(x) @ kernel; without act_bits, x @ kernel."""
    _, variables, batches = lm
    kernels = check_rtn_kernels(results("rtn_w8a8"), variables["params"], 8, None)
    for name, quantized_input in (("rtn_w8a8", True), ("rtn_w8", False)):
        io = layer_io(results(name), batches[0])
        assert sorted(io) == sorted(kernels)
        for path, (x, y) in io.items():
            atol = 1e-5 * float(np.abs(y).max())
            exact = x @ kernels[path]
            if quantized_input:
                np.testing.assert_allclose(y, token_quant(x) @ kernels[path], rtol=0, atol=atol)
                assert float(np.abs(y - exact).max()) > 100 * atol
            else:
                np.testing.assert_allclose(y, exact, rtol=0, atol=atol)


def test_smoothquant_scales_and_w8a8_layers(lm, results):
    """s_k = sqrt(max_r |x_rk| / max_n |W_kn|) over all calibration rows (alpha 0.5); the
    kernel is diag(s) W on Qwix's per-channel grid; each layer computes fq_token(x / s) @ kernel.
    """
    model, variables, batches = lm
    result = results("smoothquant_w8a8")
    inputs = dense_inputs(model, variables, batches)
    flat = flax.traverse_util.flatten_dict(result.params, sep="/")
    io = layer_io(result, batches[0])
    for path, w in block_kernels(variables["params"]).items():
        s = np.sqrt(np.abs(inputs[path]).max(axis=0) / np.abs(w).max(axis=1))
        inverse = np.asarray(flat[path + "/kernel"].inv_sq_scale)
        np.testing.assert_allclose(inverse, 1 / s, rtol=1e-5)
        smoothed, kernel, scale = (
            w * s[:, None],
            qwix_kernel(result, path),
            qwix_scale(result, path),
        )
        np.testing.assert_allclose(scale, qwix_grid_scale(smoothed, 8), rtol=1e-5)
        assert np.all(np.abs(kernel - smoothed) <= scale / 2 + 1e-5 * np.abs(smoothed))
        x, y = io[path]
        expected = token_quant(x * inverse) @ kernel
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * float(np.abs(y).max()))


def layer_error(kernel: np.ndarray, w: np.ndarray, hessian: np.ndarray) -> float:
    """tr(dW^T H dW): the squared output error over the calibration rows."""
    dw = kernel - w
    return float(np.einsum("io,ij,jo->", dw, hessian, dw))


def test_gptq_lowers_the_first_blocks_output_error(lm, results):
    model, variables, batches = lm
    inputs = dense_inputs(model, variables, batches)
    rtn, gptq = results("rtn_w8"), results("gptq_w8")
    for path in ("block_0/attn/q", "block_0/attn/k", "block_0/attn/v"):
        w = block_kernels(variables["params"])[path]
        hessian = inputs[path].T @ inputs[path]
        assert layer_error(qwix_kernel(gptq, path), w, hessian) < layer_error(
            qwix_kernel(rtn, path), w, hessian
        )


def test_awq_never_loses_to_rtn_on_its_weighted_error(lm, results):
    """AWQ's exponent 0 is RTN, so its mean((dW a)^2), a = mean_r |x_r|, is at most RTN's."""
    model, variables, batches = lm
    inputs = dense_inputs(model, variables, batches)
    rtn, awq = results("rtn_w8"), results("awq_w8")
    for path, w in block_kernels(variables["params"]).items():
        a = np.abs(inputs[path]).mean(axis=0)[:, None]

        def weighted(result, w=w, a=a, path=path):
            return float(np.mean(((qwix_kernel(result, path) - w) * a) ** 2))

        assert weighted(awq) <= weighted(rtn) * (1 + 1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_method_is_finite_and_close_to_float(lm, results, name):
    model, variables, batches = lm
    result = results(name)
    logits = result.apply(batches[1])
    float_logits = model.apply(variables, batches[1])
    assert logits.shape == float_logits.shape == (4, 16, 256)
    assert bool(jnp.all(jnp.isfinite(logits)))
    limit = 0.5 if CONFIGS[name]["weight_bits"] == 4 else 0.1
    assert relative(logits, float_logits) < limit
    assert result.calibration_s >= result.statistics_s >= 0.0
    assert result.config["method"] == CONFIGS[name]["method"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(method="hqq", weight_bits=8, group_size=None, act_bits=None), "unknown method"),
        (dict(method="rtn", weight_bits=9, group_size=None, act_bits=None), "weight_bits"),
        (dict(method="rtn", weight_bits=8, group_size=None, act_bits=1), "act_bits"),
        (dict(method="rtn", weight_bits=4, group_size=24, act_bits=None), "does not divide"),
        (dict(method="smoothquant", weight_bits=8, group_size=None, act_bits=None), "act_bits"),
        (dict(method="awq", weight_bits=4, group_size=None, act_bits=8), "weight-only"),
        (dict(method="gptq", weight_bits=3, group_size=None, act_bits=None), "GPTQ"),
    ],
)
def test_bad_arguments_raise(lm, options, message):
    model, variables, batches = lm
    with pytest.raises(ValueError, match=message):
        qwix_ptq(model, variables, batches, **options)


def test_bad_batches_raise(lm):
    model, variables, batches = lm
    rtn = CONFIGS["rtn_w8"]
    with pytest.raises(ValueError, match="non-empty"):
        qwix_ptq(model, variables, [], **rtn)
    with pytest.raises(ValueError, match="int token array"):
        qwix_ptq(model, variables, [batches[0].astype(jnp.float32)], **rtn)
