"""`kdq.quant.gptq.gptq_quantize` against a direct numpy OBQ reference and the paper's claims.

The reference (`_obq_reference`) follows the OBQ recursion literally: it keeps
the full inverse Hessian (np.linalg.inv of the damped H, no Cholesky factor, no
blocks), quantizes one row at a time with the numpy quantizer of `reference.py`,
updates the rows not yet quantized with e * Hinv[k, j] and downdates Hinv by
removing row/column k. Lazy group scales are calibrated when the group's first
row is reached, from the updated weights.

Integers are compared exactly. The two computations differ only in float64
rounding order (relative ~1e-14) and in the float32 scale (numpy's quotient
vs XLA's, at most 2 ulp = 2.4e-7 relative, see reference.py), which moves
w / s by less than 1e-5 of a level for |w / s| <= 2^bits; so an integer can
only differ where w / s lies within 1e-5 of a rounding midpoint. Each case
first asserts that no reference value does (`_MIDPOINT_MARGIN`), then asks for
equality.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kdq.quant import QuantSpec, dequantize, quantize
from kdq.quant.gptq import GPTQResult, gptq_quantize

from . import reference as ref

_MIDPOINT_MARGIN = 1e-5


def _correlated_inputs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n rows of k inputs with strongly correlated columns (and unequal energies)."""
    mixing = np.eye(k) + 0.6 * rng.standard_normal((k, k)) / np.sqrt(k)
    latent = rng.standard_normal((n, k)) * np.linspace(0.3, 2.0, k)
    shared = rng.standard_normal((n, 1)) * 1.5
    return latent @ mixing + shared


def _layer(seed: int, k: int, n_out: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, W float32, H = 2/n X^T X)."""
    rng = np.random.default_rng(seed)
    x = _correlated_inputs(rng, rows, k)
    w = (rng.standard_normal((k, n_out)) * 0.1).astype(np.float32)
    return x, w, 2.0 / rows * x.T @ x


def _reference_scale(rows: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per output column: reference.py's calibration of the given rows (float32)."""
    method, p = ref.parse_calibration(spec.calibration)
    scale = np.empty(rows.shape[1], np.float32)
    zero = np.empty(rows.shape[1], np.float32)
    for c in range(rows.shape[1]):
        lo, hi = ref.group_range(
            rows[:, c].astype(np.float32),
            signed=spec.signed,
            symmetric=spec.symmetric,
            method=method,
            p=p,
        )
        scale[c], zero[c] = ref.scale_and_zero(
            lo, hi, bits=spec.bits, signed=spec.signed, symmetric=spec.symmetric
        )
    return scale, zero


def _obq_reference(w, h, spec, damping, act_order):
    """Row-by-row OBQ with the full inverse Hessian; returns (q, scale, zero, margin)."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    hinv = np.linalg.inv(h + damping * np.mean(np.diag(h)) * np.eye(k))
    g = spec.group_size or k
    scales: list = [None] * (k // g)
    if act_order or spec.group_size is None:
        scales = [_reference_scale(w[i * g : (i + 1) * g], spec) for i in range(k // g)]
    q = np.zeros_like(w)
    margin = np.inf
    for step, row in enumerate(order):
        group = row // g
        if scales[group] is None:
            scales[group] = _reference_scale(w[group * g : (group + 1) * g], spec)
        s, z = (v.astype(np.float64) for v in scales[group])
        v = w[row] / s
        inside = (v + z >= spec.qmin - 0.5) & (v + z <= spec.qmax + 0.5)
        if inside.any():
            margin = min(margin, float(np.min(np.abs(v[inside] - np.floor(v[inside]) - 0.5))))
        q[row] = np.clip(np.round(v) + z, spec.qmin, spec.qmax)
        e = (w[row] - (q[row] - z) * s) / hinv[row, row]
        later = order[step + 1 :]
        w[later] -= np.outer(hinv[row, later], e)
        hinv = hinv - np.outer(hinv[:, row], hinv[row, :]) / hinv[row, row]
    scale = np.stack([s for s, _ in scales])
    zero = np.stack([z for _, z in scales])
    return q.astype(np.int64), scale, zero, margin


def _integers(result: GPTQResult) -> np.ndarray:
    return np.asarray(result.qarray.qvalue).astype(np.int64)


SYM4 = QuantSpec(bits=4, axes=(-1,))
AFFINE3_G16 = QuantSpec(bits=3, axes=(1,), group_size=16, symmetric=False, calibration="minmax")

CASES = {
    "per_channel_block8": (SYM4, False, 8),
    "per_channel_block_over_k": (SYM4, False, 128),
    "per_channel_act_order": (SYM4, True, 8),
    "lazy_groups_block8": (dataclasses.replace(SYM4, group_size=16), False, 8),
    "lazy_groups_block_over_k": (dataclasses.replace(SYM4, group_size=16), False, 128),
    "lazy_groups_unaligned_block": (dataclasses.replace(SYM4, group_size=16), False, 24),
    "static_groups_block8": (dataclasses.replace(SYM4, group_size=16), True, 8),
    "static_groups_block_over_k": (dataclasses.replace(SYM4, group_size=16), True, 128),
    "affine_lazy_groups": (AFFINE3_G16, False, 8),
    "affine_static_groups": (AFFINE3_G16, True, 24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_obq_reference(case):
    spec, act_order, block_size = CASES[case]
    _, w, h = _layer(seed=1, k=64, n_out=16, rows=256)
    result = gptq_quantize(w, h, spec, damping=0.01, block_size=block_size, act_order=act_order)
    q_ref, scale_ref, zero_ref, margin = _obq_reference(w, h, spec, 0.01, act_order)
    assert margin > _MIDPOINT_MARGIN, f"a reference value lies {margin:g} from a midpoint"

    np.testing.assert_allclose(np.asarray(result.qarray.scale), scale_ref, rtol=1e-6)
    if spec.symmetric:
        assert result.qarray.zero_point is None
    else:
        np.testing.assert_array_equal(np.asarray(result.qarray.zero_point), zero_ref)
    np.testing.assert_array_equal(_integers(result), q_ref)
    assert result.damping == 0.01


@pytest.mark.parametrize(
    "case", ["per_channel_act_order", "lazy_groups_block8", "affine_lazy_groups"]
)
def test_layout_dequantize_and_loss(case):
    """The QArray has quantize's layout, dequantizes to (q - z) s, and loss is tr(dW^T H dW)."""
    spec, act_order, block_size = CASES[case]
    _, w, h = _layer(seed=2, k=64, n_out=16, rows=256)
    result = gptq_quantize(w, h, spec, block_size=block_size, act_order=act_order)
    rtn = quantize(w, spec)
    got = result.qarray
    assert got.spec == spec
    assert got.qvalue.shape == rtn.qvalue.shape and got.qvalue.dtype == rtn.qvalue.dtype
    assert got.scale.shape == rtn.scale.shape and got.scale.dtype == np.float32
    if spec.symmetric:
        assert got.zero_point is None
    else:
        assert got.zero_point.shape == rtn.zero_point.shape
        assert got.zero_point.dtype == rtn.zero_point.dtype

    g = spec.group_size or w.shape[0]
    s = np.repeat(np.asarray(got.scale, np.float64), g, axis=0)
    z = 0.0 if spec.symmetric else np.repeat(np.asarray(got.zero_point, np.float64), g, axis=0)
    w_hat = (_integers(result) - z) * s
    np.testing.assert_allclose(np.asarray(dequantize(got)), w_hat, rtol=1e-6, atol=0)
    dw = w.astype(np.float64) - w_hat
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(h.shape[0])
    np.testing.assert_allclose(result.loss, np.sum(dw * (damped @ dw)), rtol=1e-9)


def test_axes_one_is_axes_minus_one():
    _, w, h = _layer(seed=3, k=32, n_out=8, rows=128)
    a = gptq_quantize(w, h, QuantSpec(bits=4, axes=(-1,), group_size=8))
    b = gptq_quantize(w, h, QuantSpec(bits=4, axes=(1,), group_size=8))
    np.testing.assert_array_equal(_integers(a), _integers(b))
    np.testing.assert_array_equal(np.asarray(a.qarray.scale), np.asarray(b.qarray.scale))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_below_round_to_nearest(bits, act_order):
    x, w, h = _layer(seed=4, k=128, n_out=32, rows=512)
    spec = QuantSpec(bits=bits, axes=(-1,))
    gptq = np.asarray(dequantize(gptq_quantize(w, h, spec, act_order=act_order).qarray))
    rtn = np.asarray(dequantize(quantize(w, spec)))
    error = np.sum((x @ w - x @ gptq) ** 2)
    rtn_error = np.sum((x @ w - x @ rtn) ** 2)
    # GPTQ exploits the correlation of the inputs: well below RTN, not just below.
    assert error < 0.7 * rtn_error, (error, rtn_error)


@pytest.mark.parametrize("spec", [SYM4, dataclasses.replace(SYM4, group_size=32), AFFINE3_G16])
def test_block_size_does_not_change_the_result(spec):
    _, w, h = _layer(seed=5, k=96, n_out=16, rows=384)
    small = gptq_quantize(w, h, spec, block_size=4)
    for block_size in (24, 128):
        other = gptq_quantize(w, h, spec, block_size=block_size)
        np.testing.assert_array_equal(_integers(small), _integers(other))
        np.testing.assert_array_equal(
            np.asarray(small.qarray.scale), np.asarray(other.qarray.scale)
        )
        np.testing.assert_allclose(small.loss, other.loss, rtol=1e-9)


@pytest.mark.parametrize("spec", [SYM4, AFFINE3_G16])
def test_dead_inputs(spec):
    """Inputs that are always zero: their rows dequantize to 0, the rest is the reduced problem."""
    rng = np.random.default_rng(6)
    x = _correlated_inputs(rng, 256, 48)
    dead = np.zeros(48, bool)
    dead[[0, 5, 17, 30, 47]] = True
    x[:, dead] = 0.0
    w = rng.standard_normal((48, 8)).astype(np.float32)
    h = 2.0 / len(x) * x.T @ x
    result = gptq_quantize(w, h, spec, damping=0.0)
    w_hat = np.asarray(dequantize(result.qarray))
    assert np.isfinite(w_hat).all() and np.isfinite(result.loss)
    np.testing.assert_array_equal(w_hat[dead], 0.0)
    if spec.group_size is None:
        # Dead rows are zeroed before calibration: the per-channel scale and the
        # live rows are those of the problem without the dead inputs.
        live = ~dead
        reduced = gptq_quantize(w[live], h[np.ix_(live, live)], spec, damping=0.0)
        np.testing.assert_array_equal(_integers(result)[live], _integers(reduced))
        np.testing.assert_array_equal(
            np.asarray(result.qarray.scale), np.asarray(reduced.qarray.scale)
        )


def test_singular_hessian_falls_back_to_more_damping():
    rng = np.random.default_rng(7)
    v = rng.standard_normal(32)
    h = np.outer(v, v)  # rank 1: not positive definite without damping
    w = rng.standard_normal((32, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"failed with damping=0; used damping=1e-06"):
        result = gptq_quantize(w, h, SYM4, damping=0.0)
    assert result.damping == pytest.approx(1e-6)
    assert np.isfinite(np.asarray(dequantize(result.qarray))).all()
    assert np.isfinite(result.loss)


def test_indefinite_hessian_raises():
    w = np.ones((8, 4), np.float32)
    with pytest.raises(ValueError, match=r"not positive definite even with damping=1"):
        gptq_quantize(w, -np.eye(8), SYM4)


_W = np.ones((16, 4), np.float32)
_H = np.eye(16)
BAD_INPUTS = {
    "weight_1d": (dict(weight=np.ones(16)), r"weight must be a 2-D Dense kernel"),
    "weight_3d": (dict(weight=np.ones((16, 2, 2))), r"weight must be a 2-D Dense kernel"),
    "hessian_shape": (dict(hessian=np.eye(15)), r"hessian must have shape \(K, K\) = \(16, 16\)"),
    "hessian_not_square": (dict(hessian=np.ones((16, 17))), r"hessian must have shape"),
    "weight_nan": (dict(weight=np.where(np.eye(16, 4) > 0, np.nan, 1.0)), r"weight contains 4"),
    "hessian_inf": (dict(hessian=np.where(np.eye(16) > 0, np.inf, 0.0)), r"hessian contains 16"),
    "hessian_asymmetric": (dict(hessian=np.triu(np.ones((16, 16)))), r"hessian is not symmetric"),
    "per_tensor": (dict(spec=QuantSpec(bits=4)), r"spec.axes must be \(-1,\) or \(1,\)"),
    "input_axis": (dict(spec=QuantSpec(bits=4, axes=(0,))), r"spec.axes must be \(-1,\)"),
    "group_not_dividing": (
        dict(spec=QuantSpec(bits=4, axes=(-1,), group_size=5)),
        r"group_size=5 does not divide K=16",
    ),
    "stochastic": (
        dict(spec=QuantSpec(bits=4, axes=(-1,), rounding="stochastic")),
        r"rounds to nearest, got rounding='stochastic'",
    ),
    "negative_damping": (dict(damping=-0.1), r"damping must be a finite float >= 0"),
    "block_size_zero": (dict(block_size=0), r"block_size must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises(case):
    overrides, match = BAD_INPUTS[case]
    args = {"weight": _W, "hessian": _H, "spec": SYM4} | overrides
    kwargs = {key: args.pop(key) for key in ("damping", "block_size") if key in args}
    with pytest.raises(ValueError, match=match):
        gptq_quantize(args["weight"], args["hessian"], args["spec"], **kwargs)
