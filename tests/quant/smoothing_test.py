"""SmoothQuant and AWQ per-channel scales (`kdq.quant.smoothquant`, `kdq.quant.awq`).

References: the papers' formulas evaluated by hand or in numpy here (SmoothQuant's
s_k = max|x_k|^alpha / max|W_k|^(1 - alpha); AWQ's candidates
a^alpha / sqrt(max min) searched against the squared output error computed
directly from the calibration rows), and W8A8 / weight-only output errors
measured with numpy matrix products. The quantizer is kdq's own (`quantize`,
`dequantize`, `fake_quant`), tested elsewhere against its own reference.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import QuantSpec, awq, dequantize, fake_quant, quantize
from kdq.quant.awq import AWQResult, awq_scales
from kdq.quant.smoothquant import SCALE_RANGE, smoothquant_scales

W4G32 = QuantSpec(bits=4, axes=(-1,), group_size=32)
W3 = QuantSpec(bits=3, axes=(-1,))


def _outlier_rows(rng: np.random.Generator, rows: int, k: int, channels=(1, 7, 20)) -> np.ndarray:
    """Gaussian rows whose `channels` are scaled x50 (the same channels in every call)."""
    x = rng.normal(size=(rows, k))
    x[:, list(channels)] *= 50.0
    return x


# SmoothQuant ----------------------------------------------------------------------------

ACT = np.array([4.0, 1.0, 0.0, 9.0])
WEIGHT = np.array([[1.0, -0.25], [0.5, 0.1], [2.0, 1.0], [0.0, 0.0]])


def test_smoothquant_closed_form():
    # Row maxima of |W|: 1, 0.5, 2, 0; channel 2 has no activation, channel 3 no weight.
    np.testing.assert_allclose(
        smoothquant_scales(ACT, WEIGHT, 0.5), [2.0, math.sqrt(2.0), 1.0, 1.0], rtol=1e-15
    )
    np.testing.assert_allclose(
        smoothquant_scales(ACT, WEIGHT, 0.25), [math.sqrt(2.0), 2**0.75, 1.0, 1.0], rtol=1e-15
    )
    np.testing.assert_array_equal(smoothquant_scales(ACT, WEIGHT, 1.0), [4.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(smoothquant_scales(ACT, WEIGHT, 0.0), [1.0, 2.0, 1.0, 1.0])
    assert smoothquant_scales(ACT, WEIGHT).dtype == np.float64


def test_smoothquant_extreme_alphas():
    rng = np.random.default_rng(0)
    act = rng.uniform(0.1, 30.0, size=16)
    w = rng.normal(size=(16, 5))
    np.testing.assert_allclose(smoothquant_scales(act, w, 0.0), 1.0 / np.abs(w).max(axis=1))
    np.testing.assert_allclose(smoothquant_scales(act, w, 1.0), act)


def test_smoothquant_balances_activation_and_weight_maxima():
    rng = np.random.default_rng(1)
    x = _outlier_rows(rng, 64, 32)
    w = rng.normal(size=(32, 8)) * 0.1
    s = smoothquant_scales(np.abs(x).max(axis=0), w, 0.5)
    # After migration each channel's activation and weight maxima are both sqrt(m_k w_k).
    np.testing.assert_allclose(np.abs(x / s).max(axis=0), np.abs(s[:, None] * w).max(axis=1))


def test_smoothquant_scales_are_clipped():
    w = np.array([[1e6, 0.0], [1e-6, 0.0]])
    s = smoothquant_scales(np.array([1e-12, 1e12]), w, 0.5)
    np.testing.assert_array_equal(s, SCALE_RANGE)
    assert SCALE_RANGE == (1e-5, 1e5)


def test_smoothing_preserves_the_layer():
    rng = np.random.default_rng(2)
    x = _outlier_rows(rng, 32, 48)
    w = rng.normal(size=(48, 12))
    s = smoothquant_scales(np.abs(x).max(axis=0), w, 0.5)
    expected = x @ w
    np.testing.assert_allclose((x / s) @ (s[:, None] * w), expected, rtol=1e-5, atol=1e-5)


def _w8a8_error(x: np.ndarray, w: np.ndarray, s: np.ndarray) -> float:
    """Mean squared error of fq(x / s) @ fq(diag(s) W) against x @ W (per-token, per-channel)."""
    rows = np.asarray(fake_quant(jnp.asarray(x / s, jnp.float32), QuantSpec(bits=8, axes=(0,))))
    kernel = np.asarray(
        fake_quant(jnp.asarray(s[:, None] * w, jnp.float32), QuantSpec(bits=8, axes=(-1,)))
    )
    y = rows.astype(np.float64) @ kernel.astype(np.float64)
    return float(np.mean((y - x @ w) ** 2))


def test_smoothquant_lowers_the_w8a8_error_with_outlier_channels():
    rng = np.random.default_rng(3)
    x = _outlier_rows(rng, 256, 64)
    w = rng.normal(size=(64, 32)) * 0.1
    s = smoothquant_scales(np.abs(x).max(axis=0), w, 0.5)
    smoothed, plain = _w8a8_error(x, w, s), _w8a8_error(x, w, np.ones(64))
    assert smoothed < 0.5 * plain


@pytest.mark.parametrize(
    ("act", "weight", "alpha", "match"),
    [
        (ACT, WEIGHT, 1.5, "alpha"),
        (ACT, WEIGHT, -0.1, "alpha"),
        (ACT, WEIGHT, float("nan"), "alpha"),
        (ACT, WEIGHT, True, "alpha"),
        (ACT, WEIGHT, "0.5", "alpha"),
        (np.array([np.nan, 1.0, 1.0, 1.0]), WEIGHT, 0.5, "finite"),
        (np.array([np.inf, 1.0, 1.0, 1.0]), WEIGHT, 0.5, "finite"),
        (np.array([-1.0, 1.0, 1.0, 1.0]), WEIGHT, 0.5, ">= 0"),
        (ACT[:3], WEIGHT, 0.5, r"\(K,\)"),
        (ACT, WEIGHT[:, 0], 0.5, r"\(K, N\)"),
        (ACT, np.where(WEIGHT == 2.0, np.nan, WEIGHT), 0.5, "weight must be finite"),
    ],
)
def test_smoothquant_refuses_bad_input(act, weight, alpha, match):
    with pytest.raises(ValueError, match=match):
        smoothquant_scales(act, weight, alpha)


# AWQ ------------------------------------------------------------------------------------


def _round_trip(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    return np.asarray(dequantize(quantize(jnp.asarray(w, jnp.float32), spec)), np.float64)


def _awq_weight(w: np.ndarray, s: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """W_hat(s) = diag(1/s) Q(diag(s) W), with diag(s) W formed in float32."""
    s32 = np.asarray(s, np.float32)
    return _round_trip(s32[:, None] * w.astype(np.float32), spec) / s32.astype(np.float64)[:, None]


def _row_error(x: np.ndarray, w_hat: np.ndarray, w: np.ndarray) -> float:
    """sum_r ||x_r W_hat - x_r W||^2, straight from the rows."""
    return float(np.sum((x @ w_hat - x @ w) ** 2))


def _layer(seed: int, k: int = 128, n: int = 48, rows: int = 512):
    rng = np.random.default_rng(seed)
    train, held_out = _outlier_rows(rng, rows, k), _outlier_rows(rng, rows, k)
    return train, held_out, rng.normal(size=(k, n))


@pytest.mark.parametrize("spec", [W4G32, W3], ids=["w4g32", "w3"])
def test_awq_matches_a_search_over_the_rows(spec):
    train, _, w = _layer(0)
    a = np.abs(train).mean(axis=0)
    result = awq_scales(w, train.T @ train, a, spec, grid=20)
    assert isinstance(result, AWQResult)
    alphas = [i / 20 for i in range(20)]
    candidates = [a**alpha / math.sqrt((a**alpha).max() * (a**alpha).min()) for alpha in alphas]
    errors = [_row_error(train, _awq_weight(w, s, spec), w) for s in candidates]
    best = int(np.argmin(errors))
    assert result.alpha == alphas[best]
    assert result.scales.dtype == np.float32 and result.scales.shape == (128,)
    np.testing.assert_allclose(result.scales, candidates[best], rtol=1e-6)
    np.testing.assert_allclose(result.error, errors[best], rtol=1e-6)
    np.testing.assert_allclose(result.rtn_error, errors[0], rtol=1e-6)


@pytest.mark.parametrize("spec", [W4G32, W3], ids=["w4g32", "w3"])
def test_awq_beats_rtn_on_held_out_rows(spec):
    train, held_out, w = _layer(1)
    result = awq_scales(w, train.T @ train, np.abs(train).mean(axis=0), spec)
    assert result.alpha > 0
    awq_w, rtn_w = _awq_weight(w, result.scales, spec), _round_trip(w, spec)
    awq_mse = np.mean((held_out @ awq_w - held_out @ w) ** 2)
    rtn_mse = np.mean((held_out @ rtn_w - held_out @ w) ** 2)
    assert awq_mse < 0.8 * rtn_mse


def test_the_hessian_error_is_the_rows_squared_output_error():
    train, _, w = _layer(2)
    result = awq_scales(w, train.T @ train, np.abs(train).mean(axis=0), W4G32)
    direct = _row_error(train, _awq_weight(w, result.scales, W4G32), w)
    np.testing.assert_allclose(result.error, direct, rtol=1e-6)
    np.testing.assert_allclose(
        result.rtn_error, _row_error(train, _round_trip(w, W4G32), w), rtol=1e-6
    )
    assert result.error <= result.rtn_error
    # A normalised Hessian (the mean over rows) gives the mean per row, and the same choice.
    mean = awq_scales(w, train.T @ train / len(train), np.abs(train).mean(axis=0), W4G32)
    np.testing.assert_allclose(mean.error, direct / len(train), rtol=1e-6)
    np.testing.assert_array_equal(mean.scales, result.scales)


def test_awq_is_invariant_to_the_scale_of_the_statistics():
    train, _, w = _layer(3, k=64, n=16, rows=128)
    h, a = train.T @ train, np.abs(train).mean(axis=0)
    base = awq_scales(w, h, a, W3, grid=10)
    scaled = awq_scales(w, 4.0 * h, 8.0 * a, W3, grid=10)
    assert scaled.alpha == base.alpha
    np.testing.assert_allclose(scaled.scales, base.scales, rtol=1e-6)
    np.testing.assert_allclose(scaled.error, 4.0 * base.error, rtol=1e-6)


def test_a_grid_of_one_is_round_to_nearest():
    train, _, w = _layer(4, k=64, n=16, rows=128)
    result = awq_scales(w, train.T @ train, np.abs(train).mean(axis=0), W4G32, grid=1)
    assert result.alpha == 0.0
    np.testing.assert_array_equal(result.scales, np.ones(64, np.float32))
    assert result.error == result.rtn_error
    np.testing.assert_allclose(result.error, _row_error(train, _round_trip(w, W4G32), w), rtol=1e-6)


def test_dead_channels_get_finite_scales():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(128, 32))
    x[:, :2] = 0.0  # channels that never fire
    w = rng.normal(size=(32, 8))
    a = np.abs(x).mean(axis=0)
    result = awq_scales(w, x.T @ x, a, W3, grid=10)
    assert np.isfinite(result.scales).all() and (result.scales > 0).all()
    # a is floored at 1e-4 max(a) before the exponent: the dead channels hold the minimum.
    floored = np.maximum(a, 1e-4 * a.max()) ** result.alpha
    expected = floored / math.sqrt(floored.max() * floored.min())
    np.testing.assert_allclose(result.scales, expected, rtol=1e-6)
    zero = awq_scales(w, np.zeros((32, 32)), np.zeros(32), W3, grid=4)
    np.testing.assert_array_equal(zero.scales, np.ones(32, np.float32))
    assert zero.error == 0.0


def test_awq_runs_at_transformer_size():
    # K = 1536, N = 384, grid 20: runs in about a second on two CPU cores (not timed here).
    rng = np.random.default_rng(6)
    x = rng.normal(size=(64, 1536))
    result = awq_scales(
        rng.normal(size=(1536, 384)), x.T @ x, np.abs(x).mean(axis=0), W4G32, grid=20
    )
    assert result.scales.shape == (1536,) and result.error <= result.rtn_error


GOOD = (np.ones((64, 4)), np.eye(64), np.ones(64))


@pytest.mark.parametrize(
    ("weight", "hessian", "mean_abs", "spec", "grid", "match"),
    [
        (*GOOD, W4G32, 0, "grid"),
        (*GOOD, W4G32, True, "grid"),
        (*GOOD, W4G32, 2.0, "grid"),
        (np.ones(64), GOOD[1], GOOD[2], W4G32, 4, "2-D"),
        (GOOD[0], np.eye(32), GOOD[2], W4G32, 4, r"\(K, K\)"),
        (GOOD[0], GOOD[1], np.ones(32), W4G32, 4, r"\(K,\)"),
        (np.full((64, 4), np.nan), GOOD[1], GOOD[2], W4G32, 4, "weight must be finite"),
        (GOOD[0], np.full((64, 64), np.inf), GOOD[2], W4G32, 4, "hessian must be finite"),
        (GOOD[0], GOOD[1], np.full(64, np.nan), W4G32, 4, "act_mean_abs must be finite"),
        (GOOD[0], GOOD[1], -np.ones(64), W4G32, 4, ">= 0"),
        (GOOD[0], np.triu(np.ones((64, 64))), GOOD[2], W4G32, 4, "symmetric"),
        (*GOOD, QuantSpec(bits=4, axes=(-1,), group_size=48), 4, "group_size=48"),
        (*GOOD, QuantSpec(bits=4, axes=(-1,), rounding="stochastic"), 4, "nearest"),
        (*GOOD, "int4", 4, "QuantSpec"),
    ],
)
def test_awq_refuses_bad_input(weight, hessian, mean_abs, spec, grid, match):
    with pytest.raises(ValueError, match=match):
        awq_scales(weight, hessian, mean_abs, spec, grid=grid)


def test_chunked_search_gives_the_same_result(monkeypatch):
    train, _, w = _layer(7, k=64, n=16, rows=128)
    args = (w, train.T @ train, np.abs(train).mean(axis=0), W4G32)
    whole = awq_scales(*args, grid=10)
    monkeypatch.setattr(awq, "CHUNK_ELEMENTS", 3 * w.size)  # chunks of 3, 3, 3 and 1
    chunked = awq_scales(*args, grid=10)
    assert chunked.alpha == whole.alpha and chunked.error == whole.error
    assert chunked.rtn_error == whole.rtn_error
    np.testing.assert_array_equal(chunked.scales, whole.scales)
