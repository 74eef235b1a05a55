"""Straight-through estimators, LSQ and PACT against independent numpy formulas."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import (
    QuantSpec,
    clipped_straight_through,
    fake_quant,
    learned_alpha,
    learned_scale,
    learned_state,
    learned_step,
    lsq_fake_quant,
    lsq_grad_scale,
    pact_fake_quant,
    round_ste,
    straight_through,
)

from . import reference as ref


def _vjp(fn, *args, cotangent):
    out, pullback = jax.vjp(fn, *args)
    return np.asarray(out), [np.asarray(g) for g in pullback(jnp.asarray(cotangent))]


def _sum_to_shape(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a full-size gradient over the axes a parameter of `shape` was broadcast along."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    for axis, n in enumerate(shape):
        if n == 1:
            g = g.sum(axis=axis, keepdims=True)
    return g.reshape(shape)


def _below(v):
    """The float32 just below v."""
    return np.nextafter(np.float32(v), np.float32(-np.inf))


def _above(v):
    return np.nextafter(np.float32(v), np.float32(np.inf))


# ---------------------------------------------------------------- straight-through


def test_straight_through_forward_and_gradient():
    x = jnp.array([0.3, -1.7, 2.5, 4.0])
    cot = np.array([1.0, -2.0, 0.5, 3.0], np.float32)

    def f(x, y):
        return straight_through(x, y)

    out, (gx, gy) = _vjp(f, x, jnp.sin(x) * 10, cotangent=cot)
    np.testing.assert_array_equal(out, np.asarray(jnp.sin(x) * 10))
    np.testing.assert_array_equal(gx, cot)  # d/dx = 1
    np.testing.assert_array_equal(gy, np.zeros(4))  # no gradient to y
    # through jit and composed with a non-linear function of the output
    g = jax.jit(jax.grad(lambda x: jnp.sum(straight_through(x, jnp.round(x)) ** 2)))(x)
    np.testing.assert_array_equal(np.asarray(g), 2 * np.round(np.asarray(x)))


def test_round_ste_is_half_to_even_with_identity_gradient():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 7.2, -7.7], np.float32)
    np.testing.assert_array_equal(np.asarray(round_ste(x)), np.round(x))
    cot = np.arange(1, 10, dtype=np.float32)
    _, (g,) = _vjp(round_ste, jnp.asarray(x), cotangent=cot)
    np.testing.assert_array_equal(g, cot)
    second = jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(round_ste(u) * u))(v)))(x)
    assert np.all(np.isfinite(np.asarray(second)))


def test_clipped_straight_through_mask_is_inclusive_and_broadcasts():
    x = np.array(
        [[-1.0, -0.5, 0.0, 0.5], [_below(-1.0), 1.0, _above(1.0), 3.0]],
        np.float32,
    )
    lower = np.array([[-1.0, -0.5, -0.5, -2.0]], np.float32)  # per column
    upper = np.array([[1.0, 1.0, 0.0, 3.0]], np.float32)
    y = np.round(x * 4) / 4
    cot = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], np.float32)
    out, (gx, gy, gl, gu) = _vjp(
        clipped_straight_through, jnp.asarray(x), jnp.asarray(y), lower, upper, cotangent=cot
    )
    np.testing.assert_array_equal(out, y)
    inside = (x >= lower) & (x <= upper)
    assert inside.tolist() == [[True, True, True, True], [False, True, False, True]]
    np.testing.assert_array_equal(gx, cot * inside)
    for g in (gy, gl, gu):
        np.testing.assert_array_equal(g, np.zeros_like(g))


# ----------------------------------------------------------------------- fake_quant


def test_fake_quant_gradient_with_given_range_is_one_exactly_inside():
    # 4-bit unsigned affine, s = 0.25, z = 3: representable [(0 - 3) s, (15 - 3) s] = [-0.75, 3]
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    lo, hi = np.float32(-0.75), np.float32(3.0)
    x = np.array(
        [lo, _below(lo), hi, _above(hi), 0.0, 1.3, -0.7, -5.0, 9.0, 2.99],
        np.float32,
    )
    cot = np.linspace(1, 2, x.size).astype(np.float32)

    def f(x, scale):
        return fake_quant(x, spec, scale=scale, zero_point=3)

    out, (gx, gs) = _vjp(jax.jit(f), jnp.asarray(x), jnp.float32(0.25), cotangent=cot)
    inside = (x >= lo) & (x <= hi)
    np.testing.assert_array_equal(gx, cot * inside)
    assert float(gs) == 0.0  # the scale is a constant for fake_quant
    expected = ref.dequantize_values(
        ref.quantize_values(x, np.float32(0.25), np.float32(3), bits=4, signed=False),
        np.float32(0.25),
        np.float32(3),
    )
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, axes=(-1,), calibration="percentile,75"),
        QuantSpec(bits=3, symmetric=False, axes=(-1,), calibration="percentile,75"),
        QuantSpec(bits=8, signed=False, calibration="absmax"),
    ],
    ids=["symmetric", "affine", "unsigned"],
)
def test_fake_quant_gradient_is_indicator_of_representable_range(spec):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((9, 3)) * 3).astype(np.float32)  # 9 rows: exact 75th percentile
    cot = rng.uniform(0.5, 2, size=x.shape).astype(np.float32)
    qmin, qmax = ref.int_range(spec.bits, spec.signed)
    scale, zero, _ = ref.calibrate(x, spec)
    lower = ((qmin - zero) * scale).astype(np.float64)
    upper = ((qmax - zero) * scale).astype(np.float64)
    inside = (x >= lower) & (x <= upper)
    # x within float noise of an end of the range: the computed bound may fall on
    # either side of it (the scale is computed with a 2-ulp slack, see reference.py)
    slack = 4 * np.spacing(np.maximum(np.abs(lower), np.abs(upper)))
    edge = (np.abs(x - lower) <= slack) | (np.abs(x - upper) <= slack)
    _, (gx,) = _vjp(
        jax.jit(functools.partial(fake_quant, spec=spec)), jnp.asarray(x), cotangent=cot
    )
    np.testing.assert_array_equal(gx[~edge], (cot * inside)[~edge])
    assert set(np.unique(gx[edge] / cot[edge])) <= {0.0, 1.0}
    assert (~inside).any() or spec.calibration == "absmax"
    if spec.calibration == "absmax":
        # negative values are below the unsigned range, the rest is inside
        np.testing.assert_array_equal(gx, cot * (x >= 0))


# ------------------------------------------------------------------------------ LSQ


def lsq_reference(x, step, bits, signed, cot, grad_scale):
    """Esser et al. 2020, eq. (1) forward, eq. (3) step gradient, STE for x, eq. (5) g."""
    q_n = 2 ** (bits - 1) if signed else 0
    q_p = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    x = np.asarray(x, np.float64)
    s = np.asarray(step, np.float64)
    v = x / s
    forward = np.round(np.clip(v, -q_n, q_p)) * s
    grad_x = cot * ((v > -q_n) & (v < q_p))
    d_step = np.where(v <= -q_n, -q_n, np.where(v >= q_p, q_p, -v + np.round(v)))
    grad_step = _sum_to_shape(cot * d_step, s.shape) * grad_scale
    return forward, grad_x, grad_step


def _lsq_case(bits, signed, step_shape, rng):
    """x = v * s with v on a grid of quarters (exact in float32 with power-of-two
    steps), covering both clipping ends exactly, beyond them, and ties."""
    q_n = 2 ** (bits - 1) if signed else 0
    q_p = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    step = (2.0 ** rng.integers(-4, 2, size=step_shape)).astype(np.float32)
    v = rng.integers(-4 * q_n - 12, 4 * q_p + 12, size=(16, 4)) / 4
    v[0, :] = -q_n
    v[1, :] = q_p
    v[2, :] = [0.5, 1.5, -0.5, 2.5]
    x = (v * np.broadcast_to(step, (16, 4))).astype(np.float32)
    return x, step


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (3, False)])
@pytest.mark.parametrize("step_shape", [(), (1, 4)], ids=["per_tensor", "per_channel"])
def test_lsq_forward_and_gradients(bits, signed, step_shape):
    rng = np.random.default_rng(bits + 10 * signed + len(step_shape))
    x, step = _lsq_case(bits, signed, step_shape, rng)
    cot = rng.uniform(-2, 2, size=x.shape).astype(np.float32)
    spec = QuantSpec(bits=bits, signed=signed)
    q_p = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    n_per_step = x.size // max(step.size, 1)
    g = 1 / math.sqrt(n_per_step * q_p)  # eq. (5): g = 1 / sqrt(N_W Q_P)

    def f(x, step):
        return lsq_fake_quant(x, step, spec)

    out, (gx, gs) = _vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(step), cotangent=cot)
    forward, grad_x, grad_step = lsq_reference(x, step, bits, signed, cot, g)
    np.testing.assert_array_equal(out, forward.astype(np.float32))
    np.testing.assert_array_equal(gx, grad_x.astype(np.float32))
    assert gs.shape == step.shape
    # float32 sums of up to 64 terms vs float64: relative 1e-5 is ample
    np.testing.assert_allclose(gs, grad_step, rtol=1e-5, atol=1e-6 * g * np.abs(cot).sum())
    assert np.any(grad_x == 0) and np.any(grad_x != 0)


def test_lsq_explicit_grad_scale_and_non_dyadic_steps():
    rng = np.random.default_rng(8)
    step = np.array([[0.3, 0.07, 1.9]], np.float32)
    v = rng.uniform(-10, 10, size=(32, 3))
    # keep x / s away from rounding midpoints and the clip ends (+-0.4 from them)
    frac = v - np.floor(v)
    v = np.where(np.abs(frac - 0.5) < 0.1, v + 0.2, v)
    v = np.where(np.abs(np.abs(v) - 7.5) < 0.5, v + 1.0, v)
    x = (v * step).astype(np.float32)
    cot = rng.uniform(-1, 1, size=x.shape).astype(np.float32)
    spec = QuantSpec(bits=4)
    _, (gx, gs) = _vjp(
        lambda x, s: lsq_fake_quant(x, s, spec, grad_scale=0.125), x, step, cotangent=cot
    )
    _, grad_x, grad_step = lsq_reference(x, step, 4, True, cot, 0.125)
    np.testing.assert_array_equal(gx, grad_x.astype(np.float32))
    np.testing.assert_allclose(gs, grad_step, rtol=1e-5, atol=1e-6)


def test_lsq_grad_scale():
    assert lsq_grad_scale(64, QuantSpec(bits=4)) == 1 / math.sqrt(64 * 7)
    assert lsq_grad_scale(10, QuantSpec(bits=8, signed=False)) == 1 / math.sqrt(10 * 255)
    with pytest.raises(ValueError, match=r"num_elements=0"):
        lsq_grad_scale(0, QuantSpec())


def test_lsq_rejects_affine_spec_and_bad_step_shape():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"symmetric=False"):
        lsq_fake_quant(x, 0.1, QuantSpec(symmetric=False))
    with pytest.raises(ValueError, match=r"step of shape \(2,\) does not broadcast.*\(4, 3\)"):
        lsq_fake_quant(x, jnp.ones(2), QuantSpec())


# ----------------------------------------------------------------------------- PACT


def pact_reference(x, alpha, bits, signed, cot):
    """Choi et al. 2018: y = clip(x, 0, a), y_q = round(y (2^k - 1) / a) a / (2^k - 1);
    eq. (3): d y_q / d a = 1 for x >= a, else 0; d y_q / d x = 1 on [0, a) (STE).
    Signed variant on the two's-complement levels -2^(k-1)..2^(k-1) - 1 with
    s = a / (2^(k-1) - 1): clip to [-2^(k-1) s, a]; d/da = 1 for x >= a and
    -2^(k-1) / (2^(k-1) - 1) for x <= -2^(k-1) s (the lower clip is -2^(k-1) a / qmax)."""
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    qmin = -(2 ** (bits - 1)) if signed else 0
    x = np.asarray(x, np.float64)
    a = np.asarray(alpha, np.float64)
    lower = qmin * a / qmax
    y = np.clip(x, lower, a)
    forward = np.round(y * qmax / a) * a / qmax
    if signed:
        grad_x = cot * ((x > lower) & (x < a))
        d_alpha = np.where(x >= a, 1.0, np.where(x <= lower, qmin / qmax, 0.0))
    else:
        grad_x = cot * ((x >= 0) & (x < a))
        d_alpha = np.where(x >= a, 1.0, 0.0)
    return forward, grad_x, _sum_to_shape(cot * d_alpha, a.shape)


@pytest.mark.parametrize("bits,signed", [(2, False), (8, False), (4, True)])
@pytest.mark.parametrize("alpha_shape", [(), (1, 5)], ids=["per_tensor", "per_channel"])
def test_pact_forward_and_gradients(bits, signed, alpha_shape):
    rng = np.random.default_rng(bits + 10 * signed + len(alpha_shape))
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    qmin = -(2 ** (bits - 1)) if signed else 0
    alpha = rng.uniform(0.5, 4.0, size=alpha_shape).astype(np.float32)
    a = np.broadcast_to(alpha, (14, 5))
    # levels k + delta, |delta| <= 0.4: no rounding ambiguity; plus clipped values
    levels = rng.integers(qmin, qmax + 1, size=(14, 5))
    x = (levels + rng.uniform(-0.4, 0.4, size=(14, 5))) * a / qmax
    x[0] = a[0] * 1.5
    x[1] = -a[1] * 1.5  # below the lower clip (signed: qmin s = -(qmax + 1) / qmax a)
    x[2] = a[2]  # exactly alpha: clipped, d/da = 1
    x[3] = -a[3]  # signed: inside, the level -qmax
    x[4] = 0.0
    x[5] = (qmin - 0.3) * a[5] / qmax  # just below the lowest level: clipped
    x[6] = (qmin + 0.3) * a[6] / qmax  # rounds to the lowest level, inside
    x = x.astype(np.float32)
    cot = rng.uniform(-2, 2, size=x.shape).astype(np.float32)
    spec = QuantSpec(bits=bits, signed=signed)

    def f(x, alpha):
        return pact_fake_quant(x, alpha, spec)

    out, (gx, ga) = _vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(alpha), cotangent=cot)
    forward, grad_x, grad_alpha = pact_reference(x, alpha, bits, signed, cot)
    # forward: the same levels; the float products round differently (a few ulp)
    np.testing.assert_allclose(out, forward, rtol=2**-20, atol=1e-6 * float(np.max(alpha)))
    np.testing.assert_array_equal(gx, grad_x.astype(np.float32))
    assert ga.shape == alpha.shape
    np.testing.assert_allclose(ga, grad_alpha, rtol=1e-5, atol=1e-5)
    assert np.any(grad_alpha != 0)
    if signed:
        # the lowest level qmin s is reached (the exported integer range), and kept below it
        lowest = qmin * alpha.reshape(-1)[0] / qmax
        np.testing.assert_allclose(out[1, 0], lowest, rtol=1e-6)
        assert np.all(out >= qmin * a / qmax * (1 + 1e-6))


def test_pact_rejects_affine_spec_and_bad_alpha_shape():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"symmetric=False"):
        pact_fake_quant(x, 1.0, QuantSpec(symmetric=False))
    with pytest.raises(ValueError, match=r"alpha of shape \(2,\) does not broadcast.*\(4, 3\)"):
        pact_fake_quant(x, jnp.ones(2), QuantSpec())


# ------------------------------------------------------ positive learned parameters


def test_learned_steps_are_positive_by_construction_and_gradients_follow_the_chain_rule():
    """The state stores u = log s: d/du = s * (LSQ eq. 3/5, PACT eq. 3 gradient w.r.t. s)."""
    rng = np.random.default_rng(21)
    spec = QuantSpec(bits=4, signed=False)
    x, step = _lsq_case(4, False, (1, 4), rng)
    cot = rng.uniform(-2, 2, size=x.shape).astype(np.float32)
    state = learned_state(step, spec, "lsq")
    np.testing.assert_allclose(state["log_step"], np.log(step.astype(np.float64)), rtol=1e-6)
    g = 1 / math.sqrt((x.size // step.size) * spec.qmax)

    def lsq(u):
        return lsq_fake_quant(x, learned_step({"log_step": u}), spec)

    _, (gu,) = _vjp(lsq, state["log_step"], cotangent=cot)
    _, _, grad_step = lsq_reference(x, step, 4, False, cot, g)
    np.testing.assert_allclose(gu, step * grad_step, rtol=1e-5, atol=1e-6)
    # Any update of u keeps the step positive and finite, and u keeps its gradient.
    for shift in (-200.0, -60.0, 200.0):
        step_far = np.asarray(learned_step({"log_step": state["log_step"] + shift}))
        assert np.all((step_far > 0) & np.isfinite(step_far))
        np.testing.assert_allclose(step_far, np.exp(np.float32(np.sign(shift) * 44)), rtol=1e-6)
        out, (gu,) = _vjp(lsq, state["log_step"] + shift, cotangent=cot)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(gu))
    out, (gu,) = _vjp(lsq, state["log_step"] - 60.0, cotangent=cot)
    assert np.any(gu != 0)  # every input clipped: the step still learns (eq. 3: -Q_N / Q_P)

    alpha = np.array([[0.7, 1.3, 2.0, 3.1]], np.float32)
    pact_state = learned_state(alpha / 15, spec, "pact")
    np.testing.assert_allclose(np.exp(pact_state["log_alpha"]), alpha, rtol=1e-6)
    np.testing.assert_allclose(learned_scale(pact_state, spec), alpha / 15, rtol=1e-6)
    np.testing.assert_allclose(learned_scale(pact_state, spec, mode="pact"), alpha / 15, rtol=1e-6)
    np.testing.assert_allclose(learned_scale(state, spec), np.exp(state["log_step"]), rtol=1e-6)
    with pytest.raises(ValueError, match="no learned quantizer's state"):
        learned_scale({"scale": alpha}, spec)
    xp = (rng.uniform(-1, 5, size=(16, 4)) * alpha).astype(np.float32)

    def pact(u):
        return pact_fake_quant(xp, learned_alpha({"log_alpha": u}), spec)

    _, (gu,) = _vjp(pact, jnp.log(alpha), cotangent=cot)
    _, _, grad_alpha = pact_reference(xp, alpha, 4, False, cot)
    np.testing.assert_allclose(gu, alpha * grad_alpha, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_non_positive_steps_and_alphas_are_rejected(bad):
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"step must be positive and finite, got step="):
        lsq_fake_quant(x, jnp.array([[0.1, bad, 0.2]]), QuantSpec(bits=4))
    with pytest.raises(ValueError, match=r"alpha must be positive and finite"):
        pact_fake_quant(x, bad, QuantSpec(bits=4, signed=False))
    with pytest.raises(ValueError, match=r"scale must be positive and finite"):
        learned_state(jnp.array([bad]), QuantSpec(), "lsq")


def test_learned_state_names_missing_keys_and_modes():
    with pytest.raises(ValueError, match=r"'Dense_0'.*needs the key 'log_step' \(got \['step'\]\)"):
        learned_step({"step": 0.1}, "Dense_0")
    with pytest.raises(ValueError, match=r"mode must be one of \('lsq', 'pact'\)"):
        learned_state(0.1, QuantSpec(), "static")


def test_closed_over_steps_work_under_jit_and_traced_bad_values_give_nan():
    x = jnp.linspace(-2.0, 2.0, 16, dtype=jnp.float32)
    step = jnp.float32(0.25)
    expected = np.clip(np.round(np.asarray(x) / 0.25), -8, 7) * 0.25
    out = jax.jit(lambda t: lsq_fake_quant(x, step, QuantSpec(bits=4)) * t)(1.0)
    np.testing.assert_array_equal(out, expected)
    alpha = jnp.float32(1.5)
    spec = QuantSpec(bits=4, signed=False)
    expected = np.round(np.clip(np.asarray(x), 0.0, 1.5) / (1.5 / 15)) * np.float32(1.5 / 15)
    out = jax.jit(lambda t: pact_fake_quant(x, alpha, spec) * t)(1.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    negative = -step  # concrete, closed over below
    with pytest.raises(ValueError, match="step must be positive"):
        jax.jit(lambda t: lsq_fake_quant(x, negative, QuantSpec(bits=4)) * t)(1.0)
    assert np.isnan(jax.jit(lambda a: pact_fake_quant(x, a, spec))(-1.0)).all()
    assert np.isnan(jax.jit(lambda s: lsq_fake_quant(x, s, QuantSpec(bits=4)))(0.0)).all()
