import os

import jax
import numpy as np
import pytest

from kdq.checkpoint import StateCheckpoints, restore_quantized, save_quantized
from kdq.models import create_model
from kdq.quant import QArray, QuantSpec
from kdq.quant.integer import to_quantized_model
from kdq.quant.recipe import QuantRecipe


def _qmodel(bits, act_bits=8):
    model = create_model("mlp", num_classes=10, hidden=(256,))
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=bits, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=act_bits))],
        act_mode="static",
    )
    quant_params = {
        "activations": {
            "Dense_0": {"scale": np.float32(0.01)},
            "Dense_1": {"scale": np.float32(0.02)},
        }
    }
    return to_quantized_model(params, recipe, quant_params)


def _assert_same(a, b):
    leaves_a = jax.tree_util.tree_leaves(a, is_leaf=lambda x: isinstance(x, QArray))
    leaves_b = jax.tree_util.tree_leaves(b, is_leaf=lambda x: isinstance(x, QArray))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, QArray):
            assert x.spec == y.spec and x.qvalue.dtype == y.qvalue.dtype
            np.testing.assert_array_equal(
                np.asarray(x.qvalue, np.int32), np.asarray(y.qvalue, np.int32)
            )
            np.testing.assert_array_equal(x.scale, y.scale)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_is_bit_exact_and_keeps_the_dtype(tmp_path, bits):
    qmodel = _qmodel(bits)
    save_quantized(tmp_path / "ckpt", qmodel, metadata={"model": "mlp"})
    restored, extra = restore_quantized(tmp_path / "ckpt", expected_recipe=qmodel.recipe)
    assert extra == {"model": "mlp"}
    assert restored.recipe == qmodel.recipe
    _assert_same(qmodel.params, restored.params)
    np.testing.assert_array_equal(restored.act_scales["Dense_1"]["scale"], np.float32(0.02))


def test_int4_takes_half_the_bytes_of_int8_on_disk(tmp_path):
    sizes = {}
    for bits in (8, 4):
        qmodel = _qmodel(bits)
        sizes[bits] = save_quantized(tmp_path / f"b{bits}", qmodel)
    kernel_values = 64 * 256 + 256 * 10
    # Bytes saved by 4-bit packing: half a byte per kernel value (data is random,
    # so compression cannot account for it); fixed metadata files are the same.
    assert sizes[8] - sizes[4] >= 0.4 * kernel_values


def test_no_float_copy_of_a_quantized_weight_is_stored(tmp_path):
    qmodel = _qmodel(8)
    save_quantized(tmp_path / "ckpt", qmodel)
    float_bytes = 4 * (64 * 256 + 256 * 10)
    total = sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(tmp_path / "ckpt")
        for f in files
    )
    assert total < 0.5 * float_bytes


def test_a_different_recipe_is_refused(tmp_path):
    qmodel = _qmodel(4)
    save_quantized(tmp_path / "ckpt", qmodel)
    other = QuantRecipe(weight_rules=[(".*kernel", QuantSpec(bits=8, axes=(-1,)))])
    with pytest.raises(ValueError, match=r"different recipe:\n  saved:.*\n  expected:"):
        restore_quantized(tmp_path / "ckpt", expected_recipe=other)


def _data_files(directory):
    return [
        os.path.join(root, f)
        for root, _, files in os.walk(directory)
        for f in files
        if "ocdbt" in root and os.path.getsize(os.path.join(root, f)) > 100
    ]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_quantized(tmp_path / "ckpt", _qmodel(4))
    for path in _data_files(tmp_path / "ckpt"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="incomplete or damaged"):
        restore_quantized(tmp_path / "ckpt")


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no quantized checkpoint at"):
        restore_quantized(tmp_path / "nothing")


def test_a_corrupt_latest_state_checkpoint_keeps_the_earlier_ones(tmp_path):
    state = {"w": np.arange(10, dtype=np.float32), "step": np.int32(0)}
    manager = StateCheckpoints(tmp_path, keep=3, every=1)
    for step in (1, 2):
        manager.save(step, {**state, "w": state["w"] + step})
    manager.close()
    for path in _data_files(tmp_path / "2"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    manager = StateCheckpoints(tmp_path, keep=3, every=1)
    with pytest.raises(ValueError, match=r"checkpoint .*2 cannot be restored.*move that step"):
        manager.restore_latest(state)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    restored = manager.restore(1)
    np.testing.assert_array_equal(restored["w"], state["w"] + 1)
    manager.close()


def _sparse_qmodel(sparsity, bits=4):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(256, 128)).astype(np.float32)
    threshold = np.quantile(np.abs(kernel), sparsity)
    kernel[np.abs(kernel) < threshold] = 0.0
    params = {"Dense_0": {"kernel": kernel, "bias": np.zeros(128, np.float32)}}
    recipe = QuantRecipe(weight_rules=[(".*kernel", QuantSpec(bits=bits, axes=(-1,)))])
    return to_quantized_model(params, recipe)


@pytest.mark.parametrize("bits", [8, 4])
def test_sparse_export_round_trips_bit_exactly(tmp_path, bits):
    qmodel = _sparse_qmodel(0.75, bits)
    save_quantized(tmp_path / "ckpt", qmodel)
    restored, _ = restore_quantized(tmp_path / "ckpt")
    _assert_same(qmodel.params, restored.params)
    assert np.mean(np.asarray(restored.params["Dense_0"]["kernel"].qvalue) == 0) >= 0.75


def test_bytes_on_disk_decrease_with_sparsity(tmp_path):
    sizes = [save_quantized(tmp_path / f"s{s}", _sparse_qmodel(s)) for s in (0.0, 0.5, 0.75, 0.9)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4


@pytest.mark.parametrize(
    ("weight_mode", "act_mode"), [("lsq", "lsq"), ("lsq", "pact"), ("calibrated", "static")]
)
def test_restored_checkpoint_gives_float_params_and_quantizer_state(
    tmp_path, weight_mode, act_mode
):
    from kdq.quant import dequantize, init_quant_params, to_qat_state

    model = create_model("mlp", num_classes=10, hidden=(32,))
    x = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=4, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=4, signed=False))],
        weight_mode=weight_mode,
        act_mode=act_mode,
    )
    quant_params = init_quant_params(model, variables, recipe, [x])
    qmodel = to_quantized_model(variables["params"], recipe, quant_params)
    save_quantized(tmp_path / "ckpt", qmodel)
    restored, _ = restore_quantized(tmp_path / "ckpt")
    params, state = to_qat_state(restored)
    kernel = qmodel.params["Dense_0"]["kernel"]
    np.testing.assert_array_equal(params["Dense_0"]["kernel"], dequantize(kernel))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        state["activations"],
        quant_params["activations"],
    )
    if weight_mode == "lsq":
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, state["weights"], quant_params["weights"]
        )
    again = to_quantized_model(params, recipe, state)
    if weight_mode == "lsq":
        _assert_same(qmodel.params, again.params)
    else:
        # Calibrated weights are re-calibrated from the dequantized values:
        # the same integers, scales equal to float32 rounding.
        for layer in ("Dense_0", "Dense_1"):
            a, b = qmodel.params[layer]["kernel"], again.params[layer]["kernel"]
            np.testing.assert_array_equal(np.asarray(a.qvalue, int), np.asarray(b.qvalue, int))
            np.testing.assert_allclose(a.scale, b.scale, rtol=2e-7)
