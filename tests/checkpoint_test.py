import json
import os

import jax
import numpy as np
import pytest

from kdq.checkpoint import (
    COMMIT_MARKER,
    DamagedCheckpointError,
    StateCheckpoints,
    directory_bytes,
    export_model,
    load_float_variables,
    payload_bytes,
    restore_quantized,
    save_quantized,
)
from kdq.models import create_model
from kdq.quant import QArray, QuantSpec
from kdq.quant.integer import to_quantized_model
from kdq.quant.recipe import QuantRecipe


def _qmodel(bits, act_bits=8, *, signed=True, symmetric=True):
    model = create_model("mlp", num_classes=10, hidden=(256,))
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
    # min-max calibration: affine zero points that differ between channels
    calibration = "absmax" if symmetric else "minmax"
    spec = QuantSpec(
        bits=bits, signed=signed, symmetric=symmetric, axes=(-1,), calibration=calibration
    )
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", spec)],
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
            assert (x.zero_point is None) == (y.zero_point is None)
            if x.zero_point is not None:
                assert x.zero_point.dtype == y.zero_point.dtype
                np.testing.assert_array_equal(
                    np.asarray(x.zero_point, np.int32), np.asarray(y.zero_point, np.int32)
                )
        else:
            np.testing.assert_array_equal(x, y)


ROUND_TRIP_SPECS = [
    # (bits, signed, symmetric)
    (8, True, True),
    (4, True, True),
    (2, True, True),
    (3, True, True),
    (8, False, False),
    (4, False, False),  # affine uint4 with per-channel zero points
    (4, True, False),  # affine int4
    (3, False, False),
    (2, False, False),
    (2, True, False),
    (1, False, False),
]


@pytest.mark.parametrize(("bits", "signed", "symmetric"), ROUND_TRIP_SPECS)
def test_round_trip_is_bit_exact_and_keeps_the_dtype(tmp_path, bits, signed, symmetric):
    qmodel = _qmodel(bits, signed=signed, symmetric=symmetric)
    if not symmetric:  # the fixture must exercise the zero points
        zero_point = np.asarray(qmodel.params["Dense_0"]["kernel"].zero_point, np.int32)
        assert len(np.unique(zero_point)) > 1
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


def test_2_bit_weights_take_a_quarter_byte_each(tmp_path):
    kernel_values = 64 * 256 + 256 * 10
    q2, q4, q8 = (_qmodel(bits) for bits in (2, 4, 8))
    kernels = [
        [q.params[layer]["kernel"] for layer in ("Dense_0", "Dense_1")] for q in (q2, q4, q8)
    ]
    scale_bytes = 4 * (256 + 10)
    # Closed form: n values of b bits take n * b / 8 bytes (both counts divide by 4).
    for bits, layers in zip((2, 4, 8), kernels, strict=True):
        assert sum(k.nbytes for k in layers) == kernel_values * bits // 8 + scale_bytes
    bias_bytes = 4 * (256 + 10)
    assert payload_bytes(q2.params) == kernel_values // 4 + scale_bytes + bias_bytes
    # On disk (random integers, so compression cannot account for it): a quarter
    # byte per kernel value less than 4-bit weights.
    disk = {bits: save_quantized(tmp_path / f"b{bits}", q) for bits, q in ((2, q2), (4, q4))}
    assert disk[4] - disk[2] >= 0.2 * kernel_values


def test_payload_bytes_of_float_and_mixed_trees():
    tree = {"a": np.zeros((3, 5), np.float32), "b": {"c": np.zeros(7, np.int8)}}
    assert payload_bytes(tree) == 3 * 5 * 4 + 7
    affine3 = _qmodel(3, signed=False, symmetric=False).params["Dense_1"]["kernel"]
    # 2560 3-bit values -> 960 bytes; 10 float32 scales; 10 3-bit zero points -> 4 bytes.
    assert affine3.nbytes == 960 + 40 + 4
    assert payload_bytes({"k": affine3, "b": np.zeros(10, np.float32)}) == 1004 + 40


def test_bytes_on_disk_do_not_vary_between_saves_of_the_same_model(tmp_path):
    qmodel = _qmodel(4)
    sizes = {save_quantized(tmp_path / f"q{i}", qmodel) for i in range(3)}
    assert len(sizes) == 1
    variables = {"params": jax.tree_util.tree_map(np.asarray, _float_params())}
    sizes = {export_model(tmp_path / f"f{i}", variables, {"model": "mlp"}) for i in range(3)}
    assert len(sizes) == 1


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


def _data_files(directory, array=""):
    """The chunk files orbax writes for the arrays under `directory` (path containing `array`)."""
    return sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(directory)
        if ".zarray" in files and array in os.path.basename(root)
        for f in files
        if not f.startswith(".")
    )


def _xor(path, n_bytes):
    """Flips every bit of `n_bytes` bytes in the middle of the file at `path`."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        assert len(data) >= n_bytes + middle
        for i in range(middle, middle + n_bytes):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def _float_params():
    model = create_model("mlp", num_classes=10, hidden=(256,))
    return model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))["params"]


def test_garbled_bytes_of_a_quantized_export_are_a_clear_error(tmp_path):
    save_quantized(tmp_path / "ckpt", _qmodel(8))
    (chunk,) = _data_files(tmp_path / "ckpt", "params.Dense_0.kernel.qvalue")
    _xor(chunk, 16)
    with pytest.raises(
        DamagedCheckpointError,
        match=r"ckpt is damaged: the bytes of params/Dense_0/kernel/qvalue "
        r"\(.*ckpt/arrays/params\.Dense_0\.kernel\.qvalue\) do not match",
    ):
        restore_quantized(tmp_path / "ckpt")


def test_garbled_bytes_of_a_float_export_are_a_clear_error(tmp_path):
    params = jax.tree_util.tree_map(np.asarray, _float_params())
    export_model(tmp_path, {"params": params}, {"model": "mlp"})
    with open(tmp_path / "model.json") as f:
        written = json.load(f)
    assert written["model"] == "mlp" and "params/Dense_0/kernel" in written["array_sha256"]
    restored = load_float_variables(tmp_path, {"params": params})
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored["params"], params)
    (chunk,) = _data_files(tmp_path / "model", "params.Dense_0.kernel")
    before = open(chunk, "rb").read()
    _xor(chunk, 16)
    with pytest.raises(
        DamagedCheckpointError,
        match=r"model is damaged: the bytes of params/Dense_0/kernel \(.*model/params\.Dense_0\.kernel\) do",
    ):
        load_float_variables(tmp_path, {"params": params})
    # Nothing was rewritten: the damaged bytes are still there for the user to inspect.
    assert open(chunk, "rb").read() != before and os.path.getsize(chunk) == len(before)


def test_an_intact_float_export_of_another_model_is_not_called_damaged(tmp_path):
    params = jax.tree_util.tree_map(np.asarray, _float_params())
    export_model(tmp_path, {"params": params}, {"model": "mlp"})
    other = create_model("mlp", num_classes=10, hidden=(32,))
    template = other.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="does not fit the requested architecture") as info:
        load_float_variables(tmp_path, template)
    assert not isinstance(info.value, DamagedCheckpointError)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_quantized(tmp_path / "ckpt", _qmodel(4))
    for path in _data_files(tmp_path / "ckpt"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DamagedCheckpointError, match="incomplete or damaged|is damaged"):
        restore_quantized(tmp_path / "ckpt")


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no quantized checkpoint at"):
        restore_quantized(tmp_path / "nothing")


def _states(tmp_path, steps=(1, 2)):
    state = {
        "w": np.random.default_rng(0).normal(size=4096).astype(np.float32),
        "step": np.zeros((), np.int32),
    }
    manager = StateCheckpoints(tmp_path, keep=3, every=1)
    for step in steps:
        manager.save(step, {"w": state["w"] + step, "step": np.asarray(step, np.int32)})
    manager.close()
    return state


def _files(directory):
    return {
        os.path.relpath(os.path.join(root, f), directory): open(os.path.join(root, f), "rb").read()
        for root, _, files in os.walk(directory)
        for f in files
    }


@pytest.mark.parametrize("damage", ["xor", "truncate"])
def test_a_damaged_latest_state_checkpoint_falls_back_to_the_one_before(tmp_path, damage):
    state = _states(tmp_path)
    (chunk,) = _data_files(tmp_path / "2", "w")
    if damage == "xor":
        _xor(chunk, 64)
    else:
        with open(chunk, "r+b") as f:
            f.truncate(os.path.getsize(chunk) // 2)
    damaged_files = _files(tmp_path / "2")
    manager = StateCheckpoints(tmp_path, keep=3, every=1)
    with pytest.warns(
        UserWarning,
        match=r"checkpoint .*/2 is damaged.*moved to .*/2\.damaged.*resumes from step 1",
    ):
        restored = manager.restore_latest(state)
    np.testing.assert_array_equal(restored["w"], state["w"] + 1)
    assert int(restored["step"]) == 1
    # The damaged step is kept, byte for byte, beside the others; training goes on.
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged"]
    assert _files(tmp_path / "2.damaged") == damaged_files
    assert manager.latest_step() == 1
    assert manager.save(2, {**state, "step": np.asarray(2, np.int32)}, force=True)
    np.testing.assert_array_equal(manager.restore(2, state)["w"], state["w"])
    manager.close()


def test_garbled_state_checkpoint_is_refused_by_restore(tmp_path):
    state = _states(tmp_path, steps=(1,))
    (chunk,) = _data_files(tmp_path / "1", "w")
    _xor(chunk, 64)
    manager = StateCheckpoints(tmp_path, keep=3, every=1)
    with pytest.raises(
        DamagedCheckpointError, match=r"checkpoint .*/1 is damaged.*: w \(.*/1/default/w\)"
    ):
        manager.restore(1, state)
    # With every step damaged there is nothing to resume from: an error, nothing moved.
    with pytest.raises(ValueError, match=r"every checkpoint in .* is damaged"):
        manager.restore_latest(state)
    assert os.listdir(tmp_path) == ["1"]
    manager.close()


def test_an_intact_state_checkpoint_of_another_config_is_not_called_damaged(tmp_path):
    state = _states(tmp_path, steps=(1,))
    manager = StateCheckpoints(tmp_path, keep=3, every=1)
    other = {"w": np.zeros(10, np.float32), "step": np.zeros((), np.int32)}
    with pytest.raises(
        ValueError, match=r"checkpoint .*1 is intact but does not fit.*different config"
    ) as info:
        manager.restore_latest(other)
    assert not isinstance(info.value, DamagedCheckpointError)
    assert os.listdir(tmp_path) == ["1"]
    np.testing.assert_array_equal(manager.restore(1)["w"], state["w"] + 1)
    manager.close()


def test_state_checkpoint_bytes_do_not_vary_between_saves(tmp_path):
    for run in ("a", "b"):
        _states(tmp_path / run)
    assert directory_bytes(tmp_path / "a" / "2") == directory_bytes(tmp_path / "b" / "2")


def test_directory_bytes_do_not_depend_on_the_path(tmp_path):
    """The same checkpoint under a short and a long path: orbax's commit markers hold the path."""
    short, long = tmp_path / "a", tmp_path / ("b" * 60)
    for run in (short, long):
        _states(run)
    markers = [os.path.join(r, n) for r, _, fs in os.walk(long) for n in fs if n == COMMIT_MARKER]
    assert markers and all(str(long) in open(m).read() for m in markers)
    assert directory_bytes(short / "2") == directory_bytes(long / "2")
    walked = sum(
        os.path.getsize(os.path.join(r, n))
        for r, _, fs in os.walk(long / "2")
        for n in fs
        if n != COMMIT_MARKER
    )
    assert directory_bytes(long / "2") == walked


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
