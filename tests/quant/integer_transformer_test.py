"""The integer path on transformer-style layers: per-group weights, Einsum, DenseGeneral.

References are numpy: int64 sums of the integers (exact), and float64
contractions of the dequantized operands, with the per-token activation
scales written from their definition (max |x| over the token / 127).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import QuantSpec
from kdq.quant.integer import fake_quant_apply, integer_apply, to_quantized_model
from kdq.quant.recipe import QuantRecipe

EPS = float(np.finfo(np.float32).eps)
B, T, D = 2, 3, 8
PER_TOKEN = QuantSpec(bits=8, axes=(0, 1))

# branch: (hand-written equation, weight spec); every branch sums over 8 products.
BRANCHES = {
    "dense": ("btd,dn->btn", QuantSpec(bits=8, axes=(-1,))),
    "dense_grouped": ("btd,dn->btn", QuantSpec(bits=4, axes=(-1,), group_size=4)),
    "qkv": ("btd,dhk->bthk", QuantSpec(bits=8, axes=(1, 2), group_size=4)),
    "out": ("bthk,hkn->btn", QuantSpec(bits=4, axes=(2,), group_size=2)),
    "einsum": ("btd,dhk->bthk", QuantSpec(bits=8, axes=(1, 2))),
    "einsum_out": ("bthk,hkn->btn", QuantSpec(bits=4, axes=(2,), group_size=2)),
    "per_position": ("btd,tdn->bnt", QuantSpec(bits=8, axes=(0, 2), group_size=4)),
}


class Branches(nn.Module):
    """Parallel projections of one (B, T, D) input, so each output is one layer deep."""

    @nn.compact
    def __call__(self, x):
        heads = x.reshape(x.shape[:2] + (2, 4))
        return {
            "dense": nn.Dense(6, name="dense")(x),
            "dense_grouped": nn.Dense(6, name="dense_grouped")(x),
            "qkv": nn.DenseGeneral((2, 3), name="qkv")(x),
            "out": nn.DenseGeneral(5, axis=(-2, -1), name="out")(heads),
            "einsum": nn.Einsum((D, 2, 3), "btd,dhk->bthk", name="einsum")(x),
            "einsum_out": nn.Einsum((2, 4, 5), name="einsum_out")(heads, "bthk,hkn->btn"),
            "per_position": nn.Einsum((T, D, 3), "btd,tdn->bnt", name="per_position")(x),
        }


def _recipe(rules, act_spec=PER_TOKEN):
    return QuantRecipe(weight_rules=rules, act_rules=[(".*", act_spec)], act_mode="dynamic")


def _expanded(scale, shape):
    """A grouped scale repeated over its groups (numpy)."""
    for axis, (d, n) in enumerate(zip(scale.shape, shape, strict=True)):
        if d != n and d != 1:
            scale = np.repeat(scale, n // d, axis=axis)
    return scale


def _per_token(x):
    """x_hat = round(x / s) s with s = max |x| over each token / 127 (float32 as kdq computes)."""
    reduce = tuple(range(2, x.ndim))
    s = (np.abs(x).max(axis=reduce, keepdims=True) / np.float32(127)).astype(np.float32)
    return np.clip(np.round(x / s), -128, 127).astype(np.float64) * s


@pytest.fixture(scope="module")
def branches():
    x = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
    x *= np.float32(10.0) ** np.arange(-1, T - 1, dtype=np.float32).reshape(1, T, 1)
    model = Branches()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda p: rng.normal(size=p.shape).astype(np.float32), variables
    )
    rules = [(f"{name}/kernel", spec) for name, (_, spec) in BRANCHES.items()]
    qmodel = to_quantized_model(params["params"], _recipe(rules))
    return model, qmodel, x


def test_every_branch_agrees_with_numpy_and_the_fake_quant_path(branches):
    model, qmodel, x = branches
    y_int = jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x)
    y_fq = jax.jit(lambda q, x: fake_quant_apply(model, q, x))(qmodel, x)
    heads = x.reshape(B, T, 2, 4)
    for name, (equation, _) in BRANCHES.items():
        kernel = qmodel.params[name]["kernel"]
        q_w = np.asarray(kernel.qvalue, np.float64)
        w_hat = q_w * _expanded(np.asarray(kernel.scale, np.float64), q_w.shape)
        x_hat = _per_token(heads if equation.startswith("bthk") else x)
        bias = np.asarray(qmodel.params[name]["bias"], np.float64)
        exact = np.einsum(equation, x_hat, w_hat) + bias  # flax's bias broadcasts on the right
        magnitude = np.einsum(equation, np.abs(x_hat), np.abs(w_hat))
        bound = (8 + 3) * EPS * magnitude + 2 * EPS * np.abs(exact)
        for path, y in (("integer", y_int[name]), ("fake quant", y_fq[name])):
            error = np.abs(np.asarray(y, np.float64) - exact)
            assert np.all(error <= bound), (name, path, float((error / bound).max()))


def test_branches_run_integer_dot_products(branches):
    model, qmodel, x = branches
    hlo = jax.jit(lambda q, x: integer_apply(model, q, x)).lower(qmodel, x).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == len(BRANCHES)
    for line in dots:
        operands, result = line.rsplit("->", 1)
        assert operands.count("xi8>") == 2 and "xi32>" in result, line


def test_per_group_integer_sums_are_exact_int64_sums():
    """y = s_x sum_G s_w[G] (sum_{k in G} q_x[k] q_w[k]): only the G-term float sum rounds."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, T, 16)).astype(np.float32)
    model = _Dense(3)
    layer = {
        "kernel": rng.normal(size=(16, 3)).astype(np.float32),
        "bias": rng.normal(size=(3,)).astype(np.float32),
    }
    spec = QuantSpec(bits=8, axes=(-1,), group_size=4)
    qmodel = to_quantized_model({"Dense_0": layer}, _recipe([(".*kernel", spec)]))
    y = np.asarray(jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x), np.float64)
    s_x = (np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    q_x = np.clip(np.round(x / s_x), -128, 127).astype(np.int64)
    kernel = qmodel.params["Dense_0"]["kernel"]
    q_w = np.asarray(kernel.qvalue, np.int64)
    s_w = np.asarray(kernel.scale, np.float64)  # (4 groups, 3)
    sums = np.einsum("btgk,gkn->btgn", q_x.reshape(B, T, 4, 4), q_w.reshape(4, 4, 3))
    terms = s_x[..., None].astype(np.float64) * s_w * sums
    exact = terms.sum(axis=-2) + layer["bias"]
    bound = (4 + 3) * EPS * np.abs(terms).sum(axis=-2) + EPS * np.abs(exact)
    assert np.all(np.abs(y - exact) <= bound)


@pytest.mark.parametrize("group_size,fits", [(1, True), (2, False)])
def test_the_int32_bound_counts_the_products_of_one_group(group_size, fits):
    """16 x 16 bits: |q_x q_w| <= 2^15 (2^15 - 1) fits int32 once, not twice."""
    model = _Dense(2)
    params = {"Dense_0": {"kernel": -np.ones((4, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    spec = QuantSpec(bits=16, axes=(-1,), group_size=group_size)
    act = QuantSpec(bits=16)
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", spec)], act_rules=[(".*", act)], act_mode="static"
    )
    qmodel = to_quantized_model(params, recipe, {"activations": {"Dense_0": {"scale": 1.0}}})
    x = np.full((1, 4), -(2.0**15), np.float32)
    if fits:
        y = np.asarray(jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x))
        # q_x = -2^15, q_w = -(2^15 - 1) with s_w = 1 / (2^15 - 1): each product is 2^15.
        np.testing.assert_allclose(y, 4 * 2.0**15, rtol=4 * EPS)
    else:
        with pytest.raises(
            ValueError,
            match=r"module 'Dense_0': its int32 accumulator can overflow: K=2 products "
            r"\(one weight group\)",
        ):
            integer_apply(model, qmodel, x)


class _Dense(nn.Module):
    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, dtype=self.dtype, name="Dense_0")(x)


class _Refused(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x):
        if self.kind == "diagonal":
            return nn.Einsum((D, D), "btd,dd->btd", use_bias=False, name="layer")(x)
        if self.kind == "contraction_scales":
            return nn.Einsum((D, 2, 3), "btd,dhk->bthk", name="layer")(x)
        if self.kind == "output_groups":
            return nn.DenseGeneral((2, 4), name="layer")(x)
        if self.kind == "conv_groups":
            return nn.Conv(2, (1,), name="layer")(x)
        return nn.DenseGeneral(3, axis=(-2, -1), name="layer")(x.reshape(B, T, 2, 4))


@pytest.mark.parametrize(
    "kind,weight_spec,act_spec,match",
    [
        ("diagonal", QuantSpec(), PER_TOKEN, r"cannot run module 'layer': .*repeated kernel"),
        (
            "contraction_scales",
            QuantSpec(axes=(0, 1)),
            PER_TOKEN,
            r"weight scales along kernel axes \(0,\).*e\.g\. axes=\(1, 2\).*\(module 'layer'\)",
        ),
        (
            "output_groups",
            QuantSpec(axes=(-1,), group_size=2),
            PER_TOKEN,
            r"weight groups along kernel axis 1 .*axes=\(1, 2\), to group along axis 0"
            r".*\(module 'layer'\)",
        ),
        (
            "conv_groups",
            QuantSpec(axes=(-1,), group_size=4),
            QuantSpec(axes=(0,)),
            r"does not support per-group weight scales of a convolution \(module 'layer'\)",
        ),
        (
            "act_on_contraction",
            QuantSpec(axes=(-1,)),
            QuantSpec(axes=(0, 1, 2)),
            r"activation scales along axes \(2,\) of the \(2, 3, 2, 4\) input.*\(module 'layer'\)",
        ),
    ],
    ids=["diagonal", "contraction_scales", "output_groups", "conv_groups", "act_on_contraction"],
)
def test_unsupported_layers_are_named(kind, weight_spec, act_spec, match):
    model = _Refused(kind)
    x = np.ones((B, T, D), np.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]["layer"]
    params = {"layer": {k: np.ones(v.shape, np.float32) for k, v in shapes.items()}}
    qmodel = to_quantized_model(params, _recipe([(".*kernel", weight_spec)], act_spec))
    with pytest.raises(ValueError, match=match):
        integer_apply(model, qmodel, x)


def test_the_output_has_the_module_dtype():
    model = _Dense(4, dtype=jnp.bfloat16)
    x = np.random.default_rng(3).normal(size=(B, T, D)).astype(np.float32)
    params = {
        "Dense_0": {"kernel": np.eye(D, 4, dtype=np.float32), "bias": np.zeros(4, np.float32)}
    }
    qmodel = to_quantized_model(params, _recipe([(".*kernel", QuantSpec(axes=(-1,)))]))
    y_int = jax.jit(lambda q, x: integer_apply(model, q, x))(qmodel, x)
    y_fq = jax.jit(lambda q, x: fake_quant_apply(model, q, x))(qmodel, x)
    assert y_int.dtype == y_fq.dtype == jnp.bfloat16
    # Both round the same real numbers to bfloat16 (8 significant bits).
    np.testing.assert_allclose(
        np.asarray(y_int, np.float32), np.asarray(y_fq, np.float32), rtol=2**-7, atol=1e-6
    )
