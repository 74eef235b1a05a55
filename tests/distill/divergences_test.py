"""Tests for kdq.distill.divergences against NumPy float64 formulas written from the papers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdq.distill import divergences

RTOL = 1e-5
ATOL = 1e-6


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(a, b):
    """sum_v a_v log(a_v / b_v) on the last axis, with 0 log 0 = 0."""
    terms = np.zeros_like(a)
    pos = a > 0
    terms[pos] = a[pos] * (np.log(a[pos]) - np.log(b[pos]))
    return terms.sum(axis=-1)


def np_entropy(w):
    return -sum(x * np.log(x) for x in (w, 1 - w) if x > 0)


def ref_forward_kl(p, q):
    return np_kl(p, q)


def ref_reverse_kl(p, q):
    return np_kl(q, p)


def ref_jsd(p, q, beta):
    """GKD's generalized JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1-beta) q."""
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)


def ref_skew_kl(p, q, alpha):
    return np_kl(p, alpha * p + (1 - alpha) * q)


def ref_skew_reverse_kl(p, q, alpha):
    return np_kl(q, alpha * q + (1 - alpha) * p)


def ref_total_variation(p, q):
    return 0.5 * np.abs(p - q).sum(axis=-1)


def reference(name, s, t, temperature, **options):
    """temperature^2 * D(softmax(t / T), softmax(s / T)) in float64."""
    p = np_softmax(np.float64(t) / temperature)
    q = np_softmax(np.float64(s) / temperature)
    divergence = globals()[f"ref_{name}"]
    return temperature**2 * divergence(p, q, **options)


FUNCTIONS = {
    "forward_kl": divergences.forward_kl,
    "reverse_kl": divergences.reverse_kl,
    "jsd": divergences.generalized_jsd,
    "skew_kl": divergences.skew_kl,
    "skew_reverse_kl": divergences.skew_reverse_kl,
    "total_variation": divergences.total_variation,
}
# (registry name, options) covering the interior and both ends of beta and alpha.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_kl", {"alpha": 1.0}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 1.0}),
    ("total_variation", {}),
]
CASE_IDS = [f"{name}-{options}" for name, options in CASES]
# One interior case per divergence.
INTERIOR = [CASES[i] for i in (0, 1, 2, 7, 10, 13)]
INTERIOR_IDS = [name for name, _ in INTERIOR]


# One shape for (almost) every test, so that eagerly run operations compile once.
SHAPE = (2, 3, 6)


def logits(seed, scale=2.0, shape=SHAPE):
    return np.float32(np.random.default_rng(seed).normal(size=shape) * scale)


def call(name, s, t, **kwargs):
    return FUNCTIONS[name](s, t, **kwargs)


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_matches_numpy_formula_per_token(name, options):
    s, t = logits(0), logits(1, scale=3.0)
    loss = call(name, s, t, temperature=2.5, **options)
    assert loss.shape == (2, 3) and loss.dtype == jnp.float32
    expected = reference(name, s, t, 2.5, **options)
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)


# The papers' defaults: GKD's beta = 0.5 (the usual JSD), DistiLLM's alpha = 0.1.
PAPER_DEFAULTS = {
    "jsd": {"beta": 0.5},
    "skew_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_defaults_on_per_example_logits_of_rank_two(name):
    s, t = logits(2, shape=(4, 6)), logits(3, shape=(4, 6))
    expected = reference(name, s, t, 1.0, **PAPER_DEFAULTS.get(name, {}))
    np.testing.assert_allclose(call(name, s, t), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("name", "options"), INTERIOR, ids=INTERIOR_IDS)
def test_identical_distributions_give_zero(name, options):
    t = logits(6)
    # A constant shift per token leaves the distribution unchanged.
    s = t + np.float32([[[1.5]], [[-3.0]]])
    np.testing.assert_allclose(call(name, s, t, temperature=2.0, **options), 0.0, atol=1e-6)


@pytest.mark.parametrize(("name", "options"), INTERIOR, ids=INTERIOR_IDS)
def test_temperature_divides_logits_and_multiplies_by_its_square(name, options):
    s, t = logits(7), logits(8)
    temperature = 3.0
    scaled = call(name, s, t, temperature=temperature, **options)
    unit = call(name, s / temperature, t / temperature, **options)
    np.testing.assert_allclose(scaled, temperature**2 * unit, rtol=RTOL, atol=ATOL)


def _disjoint_logits(gap=60.0):
    """Teacher and student each almost surely on a different token."""
    t = np.zeros(SHAPE, np.float32)
    s = np.zeros(SHAPE, np.float32)
    t[..., 0] = s[..., 1] = gap
    return s, t


def test_total_variation_lies_in_zero_one_and_reaches_one_on_disjoint_support():
    s, t = logits(9, scale=4.0), logits(10, scale=4.0)
    loss = np.asarray(divergences.total_variation(s, t))
    assert np.all(loss >= 0) and np.all(loss <= 1)
    np.testing.assert_allclose(divergences.total_variation(*_disjoint_logits()), 1.0, rtol=RTOL)
    np.testing.assert_allclose(
        divergences.total_variation(*_disjoint_logits(), temperature=1e-2), 1e-4, rtol=RTOL
    )


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.9])
def test_jsd_is_bounded_by_the_entropy_of_the_weights(beta):
    bound = np_entropy(beta)
    if beta == 0.5:
        np.testing.assert_allclose(bound, np.log(2.0))
    s, t = logits(11, scale=4.0), logits(12, scale=4.0)
    loss = np.asarray(divergences.generalized_jsd(s, t, beta=beta))
    assert np.all(loss >= 0) and np.all(loss <= bound)
    disjoint = divergences.generalized_jsd(*_disjoint_logits(), beta=beta)
    np.testing.assert_allclose(disjoint, bound, rtol=RTOL)
    # With temperature T the bound scales as T^2.
    np.testing.assert_allclose(
        divergences.generalized_jsd(*_disjoint_logits(gap=600.0), beta=beta, temperature=10.0),
        100 * bound,
        rtol=RTOL,
    )


def _limit_errors(scaled_jsd, kl, weights):
    return [np.max(np.abs(scaled_jsd(w) - kl) / kl) for w in weights]


def test_jsd_limits_are_forward_and_reverse_kl_after_scaling():
    """JSD_beta / beta -> KL(p||q) as beta -> 0 and JSD_beta / (1 - beta) -> KL(q||p) as beta -> 1.

    The unscaled JSD vanishes at both ends; the error of the scaled one is O(beta), resp.
    O(1 - beta): it drops 10x per decade.
    """
    with jax.enable_x64(True):
        s, t = np.float64(logits(13)), np.float64(logits(14))
        p, q = np_softmax(t), np_softmax(s)
        weights = [1e-3, 1e-4, 1e-5]
        to_forward = _limit_errors(
            lambda b: np.asarray(divergences.generalized_jsd(s, t, beta=b)) / b,
            ref_forward_kl(p, q),
            weights,
        )
        to_reverse = _limit_errors(
            lambda w: np.asarray(divergences.generalized_jsd(s, t, beta=1 - w)) / w,
            ref_reverse_kl(p, q),
            weights,
        )
        for edge in (0.0, 1.0):
            assert np.all(np.asarray(divergences.generalized_jsd(s, t, beta=edge)) == 0.0)
    for errors in (to_forward, to_reverse):
        assert errors[-1] < 1e-3
        for coarse, fine in zip(errors, errors[1:], strict=False):
            assert 8 < coarse / fine < 12


def test_skew_limits_are_the_plain_kls_and_zero():
    s, t = logits(15), logits(16)
    p, q = np_softmax(np.float64(t)), np_softmax(np.float64(s))
    np.testing.assert_allclose(divergences.skew_kl(s, t, alpha=0.0), np_kl(p, q), rtol=RTOL)
    np.testing.assert_allclose(divergences.skew_reverse_kl(s, t, alpha=0.0), np_kl(q, p), rtol=RTOL)
    assert np.all(np.asarray(divergences.skew_kl(s, t, alpha=1.0)) == 0.0)
    assert np.all(np.asarray(divergences.skew_reverse_kl(s, t, alpha=1.0)) == 0.0)
    # Skewing bounds the divergence by -log(alpha).
    extreme = divergences.skew_kl(*_disjoint_logits(), alpha=0.1)
    np.testing.assert_allclose(extreme, -np.log(0.1), rtol=RTOL)


def test_forward_and_reverse_kl_gradients_have_closed_forms():
    """d/ds of T^2 KL(p||q) is T (q - p); of T^2 KL(q||p) it is T q (log q - log p - KL(q||p))."""
    s, t = logits(17), logits(18)
    temperature = 2.0
    p, q = np_softmax(np.float64(t) / temperature), np_softmax(np.float64(s) / temperature)
    forward = jax.grad(lambda x: divergences.forward_kl(x, t, temperature=temperature).sum())(s)
    reverse = jax.grad(lambda x: divergences.reverse_kl(x, t, temperature=temperature).sum())(s)
    log_ratio = np.log(q) - np.log(p)
    expected_reverse = temperature * q * (log_ratio - (q * log_ratio).sum(-1, keepdims=True))
    np.testing.assert_allclose(forward, temperature * (q - p), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(reverse, expected_reverse, rtol=1e-4, atol=1e-6)


def test_jsd_gradients_match_finite_differences():
    """The mixture in log space (shared by the skew KLs) differentiates correctly."""
    with jax.enable_x64(True):
        s, t = np.float64(logits(19)), np.float64(logits(20))
        fn = functools.partial(divergences.generalized_jsd, beta=0.3, temperature=1.5)
        check_grads(fn, (s, t), order=1, modes=["rev"])


def _one_hot_teacher():
    t = np.zeros(SHAPE, np.float32)
    t[..., 2] = 1e3
    return logits(21), t


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_gradients_are_finite_at_the_edges_and_for_a_one_hot_teacher(name, options):
    s, t = _one_hot_teacher()
    value_and_grads = jax.value_and_grad(
        lambda a, b: call(name, a, b, **options).sum(), argnums=(0, 1)
    )
    loss, grads = value_and_grads(s, t)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize(
    ("name", "options"),
    [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skew_kl", {"alpha": 1.0})],
)
def test_divergences_identically_zero_have_zero_gradients(name, options):
    """No gradient leaks through the mixture branch whose weight is 0."""
    s, t = logits(22), logits(23, scale=4.0)
    grads = jax.grad(lambda a, b: call(name, a, b, **options).sum(), argnums=(0, 1))(s, t)
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(("name", "options"), INTERIOR, ids=INTERIOR_IDS)
def test_masked_tokens_are_zero_and_do_not_reach_values_or_gradients(name, options):
    s, t = logits(24), logits(25)
    where = np.array([[True, False, True], [False, True, False]])
    s_padded, t_padded = s.copy(), t.copy()
    s_padded[~where] = np.nan
    t_padded[~where] = np.inf

    def total(a, b):
        loss = call(name, a, b, where=where, **options)
        return loss.sum(), loss

    (_, loss), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(s_padded, t_padded)
    expected = reference(name, s, t, 1.0, **options)
    np.testing.assert_allclose(loss, np.where(where, expected, 0.0), rtol=RTOL, atol=ATOL)
    for grad in grads:
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[~where], 0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 1.5}, r"beta must be a number in \[0, 1\], got 1.5"),
        ({"beta": float("nan")}, r"beta must be a number in \[0, 1\], got nan"),
        ({"beta": 0.5, "temperature": 0.0}, r"temperature must be > 0, got 0.0"),
    ],
)
def test_bad_jsd_options_raise(kwargs, match):
    s, t = logits(26), logits(27)
    with pytest.raises(ValueError, match=match):
        divergences.generalized_jsd(s, t, **kwargs)


@pytest.mark.parametrize("fn", [divergences.skew_kl, divergences.skew_reverse_kl])
def test_bad_alpha_raises(fn):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got -0.1"):
        fn(np.zeros((2, 3)), np.zeros((2, 3)), alpha=-0.1)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_bad_shapes_masks_and_values_raise(name):
    s = logits(28)
    with pytest.raises(ValueError, match=r"teacher_logits must have the same shape"):
        call(name, s, s[..., :3])
    with pytest.raises(ValueError, match=r"where must be a boolean array of shape \(2, 3\)"):
        call(name, s, s, where=np.ones((2, 4), bool))
    bad = s.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"teacher_logits holds NaN or inf"):
        call(name, s, bad)
