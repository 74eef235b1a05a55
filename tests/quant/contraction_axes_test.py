"""Contraction layouts of Dense / DenseGeneral / Einsum modules, and the weight specs that fit them.

Reference: each layout's equation, run by numpy on the module's own kernel,
must give the module's own (flax) output; axes are compared with hand-written
values read off the flax documentation of each module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from kdq.quant import QuantSpec
from kdq.quant.contraction import (
    check_weight_spec,
    contraction_layout,
    describe_module,
    weight_spec_problem,
)
from kdq.quant.numerics import group_axis, scale_shape

CASES = [
    # module, input shape, kernel contraction axes, kernel output axes, input contraction axes
    (nn.Dense(3), (2, 4, 5), (0,), (1,), (2,)),
    (nn.DenseGeneral((2, 3)), (2, 5), (0,), (1, 2), (1,)),
    (nn.DenseGeneral(3, axis=(-2, -1)), (2, 4, 2, 5), (0, 1), (2,), (2, 3)),
    (nn.DenseGeneral(3, axis=(1,)), (2, 5, 4), (0,), (1,), (1,)),
    (nn.DenseGeneral(3, axis=-1, batch_dims=(0,)), (2, 4, 5), (1,), (0, 2), (2,)),
    (nn.Einsum((5, 2, 3), "btd,dhk->bthk"), (2, 4, 5), (0,), (1, 2), (2,)),
    (nn.Einsum((2, 3, 5), "...hk,hkd->...d"), (2, 4, 2, 3), (0, 1), (2,), (2, 3)),
    (nn.Einsum((4, 5, 3), "btd,tdn->bnt"), (2, 4, 5), (1,), (0, 2), (2,)),
]


@pytest.mark.parametrize(
    "module,shape,kernel_axes,output_axes,input_axes",
    CASES,
    ids=[
        "dense",
        "features",
        "two_axes",
        "middle_axis",
        "batch_dims",
        "einsum",
        "ellipsis",
        "batch",
    ],
)
def test_layout_equation_reproduces_the_module(module, shape, kernel_axes, output_axes, input_axes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    kernel = rng.normal(size=shapes["kernel"].shape)
    bias = rng.normal(size=shapes["bias"].shape)
    params = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    expected = np.asarray(jax.jit(module.apply)({"params": params}, x), np.float64)
    layout = contraction_layout(module, shape)
    assert len(layout.kernel_labels) == kernel.ndim
    assert layout.kernel_contraction_axes == kernel_axes
    assert layout.kernel_output_axes == output_axes
    assert layout.input_contraction_axes == input_axes
    y = np.einsum(layout.equation, x.astype(np.float64), params["kernel"].astype(np.float64))
    # bias_labels name the bias axes, in output order: reshaped, it broadcasts.
    sizes = dict(zip(layout.bias_labels, bias.shape, strict=True))
    y = y + params["bias"].reshape([sizes.get(c, 1) for c in layout.output_labels])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "equation,match",
    [("bd,dd->bd", "repeated kernel label"), ("btd,dn->bn", r"input axes \['t'\] summed")],
    ids=["diagonal", "input_alone"],
)
def test_einsums_that_are_not_one_contraction_are_refused(equation, match):
    module = nn.Einsum((4, 4) if "dd" in equation else (4, 3), equation)
    shape = (2, 4) if equation.startswith("bd") else (2, 3, 4)
    with pytest.raises(ValueError, match=rf"an unbound Einsum: its equation .*{match}"):
        contraction_layout(module, shape)


def test_other_modules_are_not_contractions():
    with pytest.raises(ValueError, match="a Conv is not a contraction module"):
        contraction_layout(nn.Conv(2, (3, 3)), (1, 5, 5, 2))
    assert describe_module(nn.Conv(2, (3, 3))) == "an unbound Conv"


def test_group_axis_is_the_last_axis_not_kept():
    assert group_axis((16, 4, 8), QuantSpec(axes=(1, 2), group_size=4)) == 0
    assert group_axis((16, 4, 8), QuantSpec(axes=(-1,), group_size=4)) == 1
    assert group_axis((16, 4, 8), QuantSpec(group_size=4)) == 2
    assert group_axis((16, 4, 8), QuantSpec(axes=(-1,))) is None
    assert scale_shape((16, 4, 8), QuantSpec(axes=(1, 2), group_size=4)) == (4, 4, 8)
    with pytest.raises(ValueError, match="keeps every axis"):
        group_axis((4, 8), QuantSpec(axes=(0, 1), group_size=2))


def test_weight_specs_must_keep_scales_off_the_contraction():
    module = nn.Einsum((2, 4, 5), "bthk,hkd->btd")  # sums over kernel axes 0 and 1
    layout = contraction_layout(module, (1, 3, 2, 4))
    fits = [QuantSpec(axes=(2,)), QuantSpec(axes=(2,), group_size=2), QuantSpec()]
    for spec in fits:
        assert weight_spec_problem(layout, (2, 4, 5), spec) is None
        check_weight_spec(module, layout, (2, 4, 5), spec)
    with pytest.raises(
        ValueError,
        match=r"an unbound Einsum: weight scales along kernel axes \(1,\) \(axes=\(1, 2\)\), "
        r"which the module sums over .* e\.g\. axes=\(2,\)",
    ):
        check_weight_spec(module, layout, (2, 4, 5), QuantSpec(axes=(1, 2)))
    with pytest.raises(
        ValueError,
        match=r"weight groups along kernel axis 2 \(the last axis not in axes=\(\)\).*"
        r"contraction axes are \(0, 1\)\); keep every output axis, e\.g\. axes=\(2,\), to "
        r"group along axis 1",
    ):
        check_weight_spec(module, layout, (2, 4, 5), QuantSpec(group_size=5))
