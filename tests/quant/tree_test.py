"""Quantizing whole param trees by path rules; QArray as a pytree."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import (
    QArray,
    QuantSpec,
    dequantize,
    dequantize_tree,
    fake_quant_tree,
    quantize,
    quantize_tree,
    tree_specs,
)

from . import reference as ref

KERNEL_SPEC = QuantSpec(bits=4, axes=(-1,))
MLP_RULES = [(r".*/bias", None), (r".*/kernel", KERNEL_SPEC)]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def mlp_params():
    return MLP().init(jax.random.key(0), jnp.ones((1, 5)))


def test_tree_specs_paths_and_first_match(mlp_params):
    specs = tree_specs(mlp_params, MLP_RULES)
    assert specs == [
        ("params/Dense_0/bias", None),
        ("params/Dense_0/kernel", KERNEL_SPEC),
        ("params/Dense_1/bias", None),
        ("params/Dense_1/kernel", KERNEL_SPEC),
    ]
    other = QuantSpec(bits=8)
    first_wins = [(r"params/Dense_0/kernel", None), (r".*kernel", other), (r".*", KERNEL_SPEC)]
    assert [s for _, s in tree_specs(mlp_params, first_wins)] == [
        KERNEL_SPEC,
        None,
        KERNEL_SPEC,
        other,
    ]


def test_quantize_tree_on_linen_params(mlp_params):
    qtree = quantize_tree(mlp_params, MLP_RULES)
    layers = qtree["params"]
    for name in ("Dense_0", "Dense_1"):
        assert layers[name]["bias"] is mlp_params["params"][name]["bias"]
        q = layers[name]["kernel"]
        assert isinstance(q, QArray) and q.spec == KERNEL_SPEC
        kernel = np.asarray(mlp_params["params"][name]["kernel"])
        ref.check_quantized(kernel, KERNEL_SPEC, q.scale, q.zero_point, q.qvalue, dequantize(q))
    restored = dequantize_tree(qtree)
    for name in ("Dense_0", "Dense_1"):
        assert restored["params"][name]["bias"] is mlp_params["params"][name]["bias"]
        q = layers[name]["kernel"]
        expected = ref.dequantize_values(q.qvalue, q.scale, 0)
        np.testing.assert_array_equal(np.asarray(restored["params"][name]["kernel"]), expected)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(mlp_params)


def test_fake_quant_tree_on_linen_params_and_gradient(mlp_params):
    fq = fake_quant_tree(mlp_params, MLP_RULES)
    assert jax.tree_util.tree_structure(fq) == jax.tree_util.tree_structure(mlp_params)
    for name in ("Dense_0", "Dense_1"):
        assert fq["params"][name]["bias"] is mlp_params["params"][name]["bias"]
        kernel = np.asarray(mlp_params["params"][name]["kernel"])
        got = np.asarray(fq["params"][name]["kernel"])
        assert got.dtype == kernel.dtype
        # fake_quant_tree's values are (q - z) * s of the leaf's reference quantization
        q = quantize(kernel, KERNEL_SPEC)
        ref.check_quantized(kernel, KERNEL_SPEC, q.scale, None, q.qvalue, fake_quantized=got)
    # the model runs on the fake-quantized params; absmax keeps every weight inside the
    # representable range, so the STE gradient equals the gradient at the quantized weights
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)

    def loss(p):
        return jnp.sum(MLP().apply(fake_quant_tree(p, MLP_RULES), x) ** 2)

    grads = jax.jit(jax.grad(loss))(mlp_params)
    direct = jax.grad(lambda p: jnp.sum(MLP().apply(p, x) ** 2))(fq)
    for a, b in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direct), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_quantize_tree_under_jit(mlp_params):
    qtree = jax.jit(lambda p: quantize_tree(p, MLP_RULES))(mlp_params)
    q = qtree["params"]["Dense_1"]["kernel"]
    assert isinstance(q, QArray) and q.spec == KERNEL_SPEC
    kernel = np.asarray(mlp_params["params"]["Dense_1"]["kernel"])
    ref.check_quantized(kernel, KERNEL_SPEC, q.scale, q.zero_point, q.qvalue)
    restored = jax.jit(dequantize_tree)(qtree)
    np.testing.assert_array_equal(
        np.asarray(restored["params"]["Dense_1"]["kernel"]),
        ref.dequantize_values(q.qvalue, q.scale, 0),
    )


@pytest.fixture
def nested():
    rng = np.random.default_rng(1)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return {
        "enc": [{"w": arr(4, 3), "b": arr(3)}, {"w": arr(3, 2)}],
        "head": {"w": arr(2, 2)},
        "step": jnp.asarray(7, jnp.int32),
    }


def test_nested_dicts_and_lists(nested):
    spec = QuantSpec(bits=8, symmetric=False, calibration="minmax")
    rules = [(r"enc/1/.*", None), (r".*/w", spec)]
    assert tree_specs(nested, rules) == [
        ("enc/0/b", None),
        ("enc/0/w", spec),
        ("enc/1/w", None),
        ("head/w", spec),
        ("step", None),
    ]
    out = fake_quant_tree(nested, rules)
    assert out["enc"][0]["b"] is nested["enc"][0]["b"]
    assert out["enc"][1]["w"] is nested["enc"][1]["w"]  # first match (None) wins
    assert out["step"] is nested["step"]
    assert isinstance(out["enc"], list)
    qtree = quantize_tree(nested, rules)
    for path in (("enc", 0, "w"), ("head", "w")):
        src, got, fq = nested, qtree, out
        for key in path:
            src, got, fq = src[key], got[key], fq[key]
        assert isinstance(got, QArray)
        ref.check_quantized(
            np.asarray(src), spec, got.scale, got.zero_point, got.qvalue, dequantize(got), fq
        )
    restored = dequantize_tree(qtree)
    assert restored["step"] is nested["step"]
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(nested)


def test_rule_selecting_an_integer_leaf_raises(nested):
    with pytest.raises(ValueError, match=r"'step'.*int32"):
        fake_quant_tree(nested, [(r"step", QuantSpec())])
    with pytest.raises(ValueError, match=r"'step'.*int32"):
        quantize_tree(nested, [(r".*", QuantSpec())])


def test_rules_matching_nothing_raise_with_paths(nested):
    with pytest.raises(ValueError, match=r"(?s)match no leaf.*enc/0/b.*enc/0/w.*head/w.*step"):
        quantize_tree(nested, [(r"kernel", QuantSpec())])


def test_stochastic_tree_needs_key(nested):
    rules = [(r".*/w", QuantSpec(bits=4, rounding="stochastic"))]
    with pytest.raises(ValueError, match=r"key is required.*rounding='stochastic'"):
        fake_quant_tree(nested, rules)
    out = quantize_tree(nested, rules, key=jax.random.key(0))
    q = out["head"]["w"]
    x = np.asarray(nested["head"]["w"], np.float64)
    s = float(q.scale[0, 0])
    lower = np.floor(x / s)
    got = np.asarray(q.qvalue).astype(np.int64)
    assert np.all((got == lower) | (got == lower + 1))


# --------------------------------------------------------------------- QArray pytree


def test_qarray_pytree_leaves_and_static_spec():
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    affine = quantize(x, QuantSpec(bits=4, symmetric=False, axes=(-1,)))
    leaves, treedef = jax.tree_util.tree_flatten(affine)
    assert len(leaves) == 3
    assert leaves[0] is affine.qvalue and leaves[1] is affine.scale
    assert leaves[2] is affine.zero_point
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, QArray) and rebuilt.spec == affine.spec
    symmetric = quantize(x, QuantSpec(bits=4, axes=(-1,)))
    assert [
        leaf is symmetric.qvalue or leaf is symmetric.scale
        for leaf in jax.tree_util.tree_leaves(symmetric)
    ] == [True, True]
    # the spec is static metadata: different specs, different tree structures
    other = quantize(x, QuantSpec(bits=8, symmetric=False, axes=(-1,)))
    assert jax.tree_util.tree_structure(other) != treedef


def test_qarray_through_jit_as_argument_and_output():
    x = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    spec = QuantSpec(bits=4, symmetric=False, axes=(-1,))
    q = quantize(x, spec)

    @jax.jit
    def shift(q: QArray) -> QArray:
        return q.replace(scale=q.scale * 2)

    out = shift(q)
    assert isinstance(out, QArray) and out.spec == spec
    np.testing.assert_array_equal(np.asarray(out.qvalue), np.asarray(q.qvalue))
    np.testing.assert_array_equal(np.asarray(out.scale), 2 * np.asarray(q.scale))
    deq = jax.jit(dequantize)(q)
    np.testing.assert_array_equal(
        np.asarray(deq), ref.dequantize_values(q.qvalue, q.scale, q.zero_point)
    )
    made = jax.jit(quantize, static_argnames="spec")(x, spec)
    assert isinstance(made, QArray) and made.spec == spec
    assert made.qvalue.dtype.name == "int4"
    doubled = jax.tree_util.tree_map(lambda a: a, q)
    assert isinstance(doubled, QArray) and doubled.spec == spec
