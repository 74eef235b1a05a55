"""Transformer sharding strategies: the specs the rules give, and 8 devices against 1."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh

from kdq.models import create_model
from kdq.rules import key_path_str, tree_paths
from kdq.sharding import PARAM_RULES, STRATEGIES, transformer_rules, tree_shardings

# A float32 gradient step agrees to rounding (reductions are summed in another
# order on 8 devices), not bitwise.
TOLERANCE = 1e-5

D, M = "data", "model"
COLUMNS, ROWS, REPLICATED = (None, M), (M, None), None


def _lm_tensor_specs(num_layers):
    """Megatron placement of every LM param (None: replicated)."""
    specs = {"embed/embedding": ROWS, "final_norm/scale": REPLICATED, "head/kernel": COLUMNS}
    for i in range(num_layers):
        block = {
            "attn_norm/scale": REPLICATED,
            "mlp_norm/scale": REPLICATED,
            "attn/q/kernel": COLUMNS,
            "attn/k/kernel": COLUMNS,
            "attn/v/kernel": COLUMNS,
            "attn/o/kernel": ROWS,
            "mlp/gate/kernel": COLUMNS,
            "mlp/up/kernel": COLUMNS,
            "mlp/down/kernel": ROWS,
        }
        specs.update({f"block_{i}/{path}": spec for path, spec in block.items()})
    return specs


def _encoder_tensor_specs():
    specs = {
        "embed/embedding": ROWS,
        "pos_embed/embedding": REPLICATED,
        "embed_norm/scale": REPLICATED,
        "embed_norm/bias": REPLICATED,
        "head/kernel": COLUMNS,
        "head/bias": REPLICATED,
    }
    layer = {
        "attn/o/kernel": ROWS,
        "attn/o/bias": REPLICATED,
        "mlp/up/kernel": COLUMNS,
        "mlp/up/bias": (M,),
        "mlp/down/kernel": ROWS,
        "mlp/down/bias": REPLICATED,
        **{
            f"{norm}/{p}": REPLICATED
            for norm in ("attn_norm", "mlp_norm")
            for p in ("scale", "bias")
        },
        **{f"attn/{x}/kernel": COLUMNS for x in "qkv"},
        **{f"attn/{x}/bias": (M,) for x in "qkv"},
    }
    specs.update({f"layer_0/{path}": spec for path, spec in layer.items()})
    return specs


def _fsdp_specs(tensor_specs):
    """FSDP: the first axis of every kernel and embedding over "data"."""
    return {
        path: (D,) if path.endswith(("/kernel", "/embedding")) else REPLICATED
        for path in tensor_specs
    }


# (model, strategy) -> number of LM blocks -> {param path: partition spec}
EXPECTED = {
    ("lm", "tensor"): _lm_tensor_specs,
    ("lm", "fsdp"): lambda num_layers: _fsdp_specs(_lm_tensor_specs(num_layers)),
    ("encoder", "tensor"): lambda _: _encoder_tensor_specs(),
    ("encoder", "fsdp"): lambda _: _fsdp_specs(_encoder_tensor_specs()),
}


def _padded(spec, ndim):
    return [None] * ndim if spec is None else list(spec) + [None] * (ndim - len(spec))


def _tiny(name, num_classes=8):
    if name == "lm":
        return create_model(
            "transformer_lm", num_classes=64, num_layers=2, d_model=16, num_heads=4,
            num_kv_heads=2, mlp_dim=32, max_len=8, tie_embeddings=False,
        )  # fmt: skip
    return create_model(
        "transformer_encoder", num_classes=num_classes, vocab_size=64, num_layers=1,
        d_model=16, num_heads=4, mlp_dim=32, max_len=8,
    )  # fmt: skip


def _abstract_state(model):
    """Shapes of {"params", "opt_state"} (Adam moments mirror the params)."""
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 8), jnp.int32))
    params = params["params"]
    return {"params": params, "opt_state": jax.eval_shape(optax.adam(1e-3).init, params)}


@pytest.mark.parametrize("name", ["lm", "encoder"])
@pytest.mark.parametrize("strategy", ["tensor", "fsdp"])
def test_rules_give_the_megatron_and_fsdp_placements(name, strategy):
    state = _abstract_state(_tiny(name))
    shardings = tree_shardings(state, AbstractMesh((2, 4), (D, M)), PARAM_RULES[strategy])
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    got = {key_path_str(path): sharding.spec for path, sharding in flat}
    ranks = dict(
        zip(tree_paths(state), (leaf.ndim for leaf in jax.tree.leaves(state)), strict=True)
    )
    expected = EXPECTED[(name, strategy)](2)
    assert {p.removeprefix("params/") for p in got if p.startswith("params/")} == set(expected)
    for path, spec in expected.items():
        for prefix in ("params/", "opt_state/0/mu/", "opt_state/0/nu/"):
            ndim = ranks[prefix + path]
            assert _padded(tuple(got[prefix + path]), ndim) == _padded(spec, ndim), prefix + path


def test_none_strategy_replicates_everything():
    assert PARAM_RULES["none"] == () and transformer_rules("none") == ()
    assert set(PARAM_RULES) == set(STRATEGIES) == {"none", "fsdp", "tensor"}
    state = _abstract_state(_tiny("lm"))
    shardings = tree_shardings(state, AbstractMesh((2, 4), (D, M)), PARAM_RULES["none"])
    assert all(tuple(s.spec) == () for s in jax.tree.leaves(shardings))


def test_uneven_split_is_an_error_that_names_the_leaf_and_the_fix():
    state = {"params": _abstract_state(_tiny("encoder", num_classes=10))["params"]}
    mesh = AbstractMesh((2, 4), (D, M))
    with pytest.raises(
        ValueError,
        match=r"for 'params/head/kernel' of shape \(16, 10\): axis 1 \(size 10\) does not split "
        r"evenly over 4 devices of mesh axes \('model',\); .*\('params/head/kernel', None\) first",
    ):
        tree_shardings(state, mesh, PARAM_RULES["tensor"])
    rules = (("params/head/kernel", None), *PARAM_RULES["tensor"])
    assert tuple(tree_shardings(state, mesh, rules)["params"]["head"]["kernel"].spec) == ()


def test_bad_strategy_and_unknown_mesh_axis_are_rejected():
    with pytest.raises(ValueError, match=r"strategy must be one of .*got strategy='zero'"):
        transformer_rules("zero")
    with pytest.raises(ValueError, match=r"mesh axes \['batch'\] are not in the mesh"):
        tree_shardings({"w": np.zeros((4, 4))}, AbstractMesh((2, 4), (D, M)), [("w", ("batch",))])


def _shard_shape(shape, spec, sizes):
    return [
        n // int(np.prod([sizes[a] for a in ((s,) if isinstance(s, str) else s or ())]))
        for n, s in zip(shape, spec, strict=True)
    ]


@pytest.mark.slow
def test_eight_devices_match_one_device_for_every_strategy():
    script = os.path.join(os.path.dirname(__file__), "transformer_devices.py")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    # Unoptimised CPU code generation: compiles several times faster, same arithmetic.
    fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {fast_compile}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [os.path.abspath(root), os.environ.get("PYTHONPATH")])
        ),
    }
    result = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(runs) == {"fsdp/8x1", "fsdp/2x4", "tensor/2x4"}
    for key, run in runs.items():
        strategy, mesh = key.split("/")
        sizes = dict(zip((D, M), map(int, mesh.split("x")), strict=True))
        for figure in ("loss", "grads", "params"):
            assert run[figure] < TOLERANCE, (key, figure, run[figure])
        expected = EXPECTED[("lm", strategy)](1)
        for placed in (run["placed"], run["updated"]):
            assert set(placed) == set(expected), key
            for path, (spec, shard, shape) in placed.items():
                assert spec == _padded(expected[path], len(shape)), (key, path)
                assert shard == _shard_shape(shape, spec, sizes), (key, path)
