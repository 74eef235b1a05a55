"""Straight-through estimators and quantizers with learned parameters.

* `straight_through(x, y)`: forward y, gradient with respect to x is 1
  (Bengio et al. 2013).
* `clipped_straight_through(x, y, lower, upper)`: forward y, gradient 1 where
  lower <= x <= upper and 0 outside (the representable range).
* `round_ste(x)`: round half to even, identity gradient.
* `lsq_fake_quant`: LSQ, learned step size (Esser et al. 2020).
* `pact_fake_quant`: PACT, learned clipping value (Choi et al. 2018).

The learned step s and clip value alpha are passed in as positive arrays;
`kdq.quant.quantizers` keeps them as logarithms in the trainable state
(`kdq.quant.quantizers.base.learned_value`), so they stay positive whatever
the optimizer does.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdq.quant.spec import QuantSpec


@jax.custom_jvp
def _pass_through(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    del x, mask
    return y


@_pass_through.defjvp
def _pass_through_jvp(primals, tangents):
    x, y, mask = primals
    x_dot, _, _ = tangents
    return y, x_dot * mask.astype(x_dot.dtype)


def straight_through(x: ArrayLike, y: ArrayLike) -> jax.Array:
    """Returns `y` in the forward pass, with dy/dx = 1 (no gradient to `y`).

    Args:
      x: the array the gradient flows to.
      y: the forward value, same shape as `x` (e.g. `round(x)`).

    Returns:
      `y`, with the gradient above.
    """
    x = jnp.asarray(x)
    return _pass_through(x, jnp.asarray(y, x.dtype), jnp.ones(x.shape, jnp.bool_))


def clipped_straight_through(
    x: ArrayLike, y: ArrayLike, lower: ArrayLike, upper: ArrayLike
) -> jax.Array:
    """Returns `y`, with dy/dx = 1 if lower <= x <= upper else 0.

    Args:
      x: the array the gradient flows to.
      y: the forward value, same shape as `x`.
      lower, upper: the range where the gradient passes; broadcast against x.

    Returns:
      `y`, with the gradient above.
    """
    x = jnp.asarray(x)
    inside = (x >= lower) & (x <= upper)
    return _pass_through(x, jnp.asarray(y, x.dtype), inside)


def round_ste(x: ArrayLike) -> jax.Array:
    """round(x) (half to even) with the straight-through gradient d/dx = 1.

    Args:
      x: any float array.

    Returns:
      round(x), same shape and dtype.

    >>> import jax, jax.numpy as jnp
    >>> round_ste(jnp.array([0.5, 1.5, 2.4]))
    Array([0., 2., 2.], dtype=float32)
    >>> jax.grad(lambda x: round_ste(x).sum())(jnp.array([0.5, 1.5, 2.4]))
    Array([1., 1., 1.], dtype=float32)
    """
    x = jnp.asarray(x)
    return straight_through(x, jnp.round(x))


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast cotangent `g` back to the `shape` it was broadcast from."""
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _lsq_levels(spec: QuantSpec) -> tuple[int, int]:
    """(Q_N, Q_P): the number of negative and positive levels of the paper."""
    if not spec.symmetric:
        raise ValueError(
            f"LSQ learns the step of a symmetric quantizer; got spec.symmetric={spec.symmetric}"
        )
    return -spec.qmin, spec.qmax


def lsq_grad_scale(num_elements: int, spec: QuantSpec) -> float:
    """LSQ's step-gradient scale g = 1 / sqrt(N * Q_P).

    Args:
      num_elements: N, the number of weights (N_W) sharing one step, or the
        number of features of one example (N_F) for an activation quantizer.
      spec: the quantizer; Q_P = spec.qmax.

    Returns:
      g as a Python float.

    >>> lsq_grad_scale(256, QuantSpec(bits=4))
    0.0236227795630767
    """
    if num_elements < 1:
        raise ValueError(f"num_elements must be >= 1, got num_elements={num_elements}")
    return 1.0 / math.sqrt(num_elements * spec.qmax)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lsq(x, step, q_neg, q_pos, grad_scale):
    v = x / step
    return jnp.round(jnp.clip(v, -q_neg, q_pos)) * step


def _lsq_fwd(x, step, q_neg, q_pos, grad_scale):
    v = x / step
    q = jnp.round(jnp.clip(v, -q_neg, q_pos))
    return q * step, (v, q, step)


def _lsq_bwd(q_neg, q_pos, grad_scale, residuals, g):
    v, q, step = residuals
    inside = (v > -q_neg) & (v < q_pos)
    d_step = jnp.where(v <= -q_neg, -q_neg, jnp.where(v >= q_pos, q_pos, q - v))
    grad_x = jnp.where(inside, g, 0.0)
    grad_step = _sum_to_shape(g * d_step, step.shape) * grad_scale
    return grad_x.astype(g.dtype), grad_step.astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_fake_quant(
    x: ArrayLike, step: ArrayLike, spec: QuantSpec, *, grad_scale: float | None = None
) -> jax.Array:
    """Fake quantization with a learned step size (LSQ, Esser et al. 2020).

    Forward:  x_hat = round(clip(x / s, -Q_N, Q_P)) * s, with Q_N = -spec.qmin,
    Q_P = spec.qmax.

    Backward (the paper's equations 3 and 5):
      d x_hat / d x = 1 if -Q_N < x/s < Q_P else 0
      d x_hat / d s = -x/s + round(x/s)  if -Q_N < x/s < Q_P
                      -Q_N               if x/s <= -Q_N
                       Q_P               if x/s >= Q_P
    and the step's gradient is multiplied by g = 1 / sqrt(N * Q_P).

    Args:
      x: array to quantize.
      step: learned step s > 0, broadcastable to x (a scalar per tensor, or
        e.g. shape (1, out) per output channel); trainable state stores log s
        (see `kdq.quant.learned_step`), so the gradient reaching it is s times the one below.
      spec: symmetric quantizer giving bits and signedness (its calibration is
        not used: use `calibrate` once to initialise `step`).
      grad_scale: g; default 1 / sqrt(N * Q_P) with N = x.size / step.size,
        the number of elements sharing one step (right for weights; for
        activations pass `lsq_grad_scale(features_per_example, spec)`).

    Returns:
      The fake-quantized x, dtype of x.
    """
    x = jnp.asarray(x)
    step = jnp.asarray(step, x.dtype)
    q_neg, q_pos = _lsq_levels(spec)
    step = _check_learned(step, x, "step")
    if grad_scale is None:
        grad_scale = lsq_grad_scale(max(x.size // max(step.size, 1), 1), spec)
    return _lsq(x, step, q_neg, q_pos, float(grad_scale))


def _pact_scale(alpha: jax.Array, qmax: int) -> jax.Array:
    """s = alpha / qmax, the IEEE quotient (the barrier keeps XLA from using 1 / qmax)."""
    return alpha / jax.lax.optimization_barrier(jnp.asarray(qmax, alpha.dtype))


def _pact_lower(alpha: jax.Array, qmin: int, qmax: int, signed: bool) -> jax.Array:
    """The lower clipping value: qmin * alpha / qmax (signed), 0 (unsigned)."""
    return qmin * _pact_scale(alpha, qmax) if signed else jnp.zeros_like(alpha)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pact(x, alpha, qmin, qmax, signed):
    scale = _pact_scale(alpha, qmax)
    y = jnp.clip(x, _pact_lower(alpha, qmin, qmax, signed), alpha)
    return jnp.round(y / scale) * scale


def _pact_fwd(x, alpha, qmin, qmax, signed):
    return _pact(x, alpha, qmin, qmax, signed), (x, alpha)


def _pact_bwd(qmin, qmax, signed, residuals, g):
    x, alpha = residuals
    if signed:
        lower = _pact_lower(alpha, qmin, qmax, signed)
        inside = (x > lower) & (x < alpha)
        d_alpha = jnp.where(x >= alpha, 1.0, jnp.where(x <= lower, qmin / qmax, 0.0))
    else:
        inside = (x >= 0) & (x < alpha)
        d_alpha = jnp.where(x >= alpha, 1.0, 0.0)
    grad_x = jnp.where(inside, g, 0.0)
    grad_alpha = _sum_to_shape(g * d_alpha, alpha.shape)
    return grad_x.astype(g.dtype), grad_alpha.astype(alpha.dtype)


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact_fake_quant(x: ArrayLike, alpha: ArrayLike, spec: QuantSpec) -> jax.Array:
    """Fake quantization with a learned clipping value (PACT, Choi et al. 2018).

    Forward, with s = alpha / qmax and the spec's integer levels qmin..qmax:
      y = clip(x, qmin * s, alpha),  y_q = round(y / s) * s
    Unsigned (the paper's activation quantizer): qmax = 2^bits - 1, qmin = 0,
    so y = clip(x, 0, alpha) and y_q = round(y * qmax / alpha) * alpha / qmax.
    Signed: qmax = 2^(bits-1) - 1, qmin = -2^(bits-1), so the clip range is
    [-(qmax + 1) / qmax * alpha, alpha]: the same two's-complement levels and
    scale as the exported integer model (`kdq.quant.integer`), which therefore
    computes exactly this function.

    Backward (rounding passed straight through, the paper's equation 3):
      d y_q / d x     = 1 if 0 <= x < alpha else 0
      d y_q / d alpha = 1 if x >= alpha else 0
    (signed: d/dx = 1 on (qmin s, alpha); d/d alpha = 1 where x >= alpha and
    qmin / qmax where x <= qmin s, the derivative of the lower clip qmin alpha / qmax).

    Args:
      x: activations.
      alpha: learned clipping value > 0, broadcastable to x (trainable state
        stores log alpha: see `kdq.quant.learned_alpha`).
      spec: symmetric quantizer giving bits and signedness.

    Returns:
      The fake-quantized activations, dtype of x.
    """
    x = jnp.asarray(x)
    alpha = jnp.asarray(alpha, x.dtype)
    if not spec.symmetric:
        raise ValueError(f"PACT clips to a symmetric range; got spec.symmetric={spec.symmetric}")
    alpha = _check_learned(alpha, x, "alpha")
    return _pact(x, alpha, spec.qmin, spec.qmax, spec.signed)


def _check_positive_if_concrete(value: jax.Array, name: str) -> jax.Array:
    """ValueError if a concrete step / clipping value has an entry <= 0 or non-finite.

    Concrete values (also arrays closed over by a jitted function) are checked
    on the host with numpy. A traced value cannot be checked: its bad entries
    become NaN (returned), so they never yield finite output.
    """
    if isinstance(value, jax.core.Tracer):
        return jnp.where(jnp.isfinite(value) & (value > 0), value, jnp.nan)
    values = np.asarray(value, np.float32)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        raise ValueError(
            f"{name} must be positive and finite, got {name}={values[bad].ravel()[0].item()!r}"
            f" ({int(bad.sum())} bad value(s) of {values.size}); learned state stores "
            f"log {name}: build it with kdq.quant.learned_state"
        )
    return value


def _check_learned(value: jax.Array, x: jax.Array, name: str) -> jax.Array:
    """`value` (a step or clip value), checked to broadcast to x and be positive and finite."""
    try:
        jnp.broadcast_shapes(value.shape, x.shape)
    except ValueError:
        raise ValueError(
            f"{name} of shape {value.shape} does not broadcast to x of shape {x.shape}"
        ) from None
    return _check_positive_if_concrete(value, name)
