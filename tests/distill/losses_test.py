"""Tests for kdq.distill.losses against independent NumPy implementations of the papers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdq.distill import losses

RTOL = 1e-5
ATOL = 1e-6


# ---------------------------------------------------------------------------------------
# Independent NumPy references (float64), written from the papers / official code.
# ---------------------------------------------------------------------------------------


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl_rows(p, q):
    """sum_c p_c log(p_c / q_c) per row, with 0 log 0 = 0."""
    terms = np.zeros_like(p)
    pos = p > 0
    terms[pos] = p[pos] * (np.log(p[pos]) - np.log(q[pos]))
    return terms.sum(axis=-1)


def np_smooth_l1(x):
    ax = np.abs(x)
    return np.where(ax < 1.0, 0.5 * x**2, ax - 0.5)


def np_l2_normalize(x):
    norm = np.sqrt((x**2).sum(axis=-1, keepdims=True))
    return x / np.maximum(norm, 1e-12)


def ref_standardize(logits):
    """``normalize`` of the official logit-standardisation code (Sun et al. 2024).

    ``(logit - logit.mean(-1)) / (1e-7 + logit.std(-1))``, where ``torch.std`` is the unbiased
    estimator: the sum of squared deviations over C - 1, written out here.
    """
    num_classes = logits.shape[-1]
    mean = logits.sum(axis=-1, keepdims=True) / num_classes
    std = np.sqrt(((logits - mean) ** 2).sum(axis=-1, keepdims=True) / (num_classes - 1))
    return (logits - mean) / (1e-7 + std)


def ref_kd(s, t, temperature, standardize=False):
    s, t = np.float64(s), np.float64(t)
    if standardize:
        s, t = ref_standardize(s), ref_standardize(t)
    return temperature**2 * np_kl_rows(np_softmax(t / temperature), np_softmax(s / temperature))


def ref_dkd_parts(s, t, labels, temperature):
    """TCKD and NCKD per example, following mdistiller's dkd_loss."""
    s, t = np.float64(s), np.float64(t)
    batch, num_classes = s.shape
    gt = np.zeros((batch, num_classes))
    gt[np.arange(batch), labels] = 1.0
    p_s, p_t = np_softmax(s / temperature), np_softmax(t / temperature)
    b_s = np.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], axis=1)
    b_t = np.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], axis=1)
    tckd = temperature**2 * np_kl_rows(b_t, b_s)
    p_s2 = np_softmax(s / temperature - 1000.0 * gt)
    p_t2 = np_softmax(t / temperature - 1000.0 * gt)
    nckd = temperature**2 * np_kl_rows(p_t2, p_s2)
    return tckd, nckd


def ref_dkd(s, t, labels, alpha, beta, temperature):
    tckd, nckd = ref_dkd_parts(s, t, labels, temperature)
    return alpha * tckd + beta * nckd


def ref_fitnets(s, t, kernel, bias):
    s, t = np.float64(s), np.float64(t)
    projected = np.einsum("...i,ij->...j", s, np.float64(kernel)) + np.float64(bias)
    return ((projected - t) ** 2).reshape(len(s), -1).mean(axis=1)


def ref_at(s, t, p):
    """Reference AT code on NCHW tensors: normalize(x.pow(p).mean(1).view(B, -1))."""

    def at(x):
        x = np.moveaxis(np.float64(x), -1, 1)
        return np_l2_normalize((np.abs(x) ** p).mean(axis=1).reshape(len(x), -1))

    return ((at(s) - at(t)) ** 2).mean(axis=1)


def ref_rkd(s, t, distance_weight, angle_weight):
    """Returns (per-example row contributions, official batch loss), with explicit loops."""
    s = np.float64(s).reshape(len(s), -1)
    t = np.float64(t).reshape(len(t), -1)
    n = len(s)

    def pdist(e):
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = np.sqrt(max(np.sum((e[i] - e[j]) ** 2), 1e-12))
        return d / d[d > 0].mean()

    def angles(e):
        a = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if j != i and k != i:
                        u, v = e[j] - e[i], e[k] - e[i]
                        a[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return a

    dist = np_smooth_l1(pdist(s) - pdist(t))
    angle = np_smooth_l1(angles(s) - angles(t))
    per_example = distance_weight * dist.mean(axis=1) + angle_weight * angle.mean(axis=(1, 2))
    batch = distance_weight * dist.mean() + angle_weight * angle.mean()
    return per_example, batch


def ref_pkt(s, t, eps):
    """Returns (per-row KL terms, official batch loss torch.mean(...))."""

    def probs(x):
        x = np.float64(x).reshape(len(x), -1)
        x = x / (np.sqrt((x**2).sum(axis=1, keepdims=True)) + eps)
        k = (x @ x.T + 1.0) / 2.0
        return k / k.sum(axis=1, keepdims=True)

    q, p = probs(t), probs(s)
    terms = q * np.log((q + eps) / (p + eps))
    return terms.sum(axis=1), terms.mean()


def ref_sp(s, t):
    """Returns (per-example row contributions, ||G_t - G_s||_F^2 / B^2)."""
    batch = len(s)

    def gram(x):
        x = np.float64(x).reshape(batch, -1)
        return np_l2_normalize(x @ x.T)

    diff = gram(t) - gram(s)
    return (diff**2).sum(axis=1) / batch, (diff**2).sum() / batch**2


# ---------------------------------------------------------------------------------------
# Helpers and shared cases.
# ---------------------------------------------------------------------------------------


def randn(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def relu_feat(seed, *shape):
    return np.maximum(randn(seed, *shape), 0.0)


def make_projection(seed, cs, ct):
    return {"kernel": randn(seed, cs, ct, scale=0.5), "bias": randn(seed + 1, ct)}


def assert_close(actual, expected):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


BATCH = 8
LABELS = np.array([3, 0, 9, 9, 1, 4, 7, 2], dtype=np.int32)
PROJECTION = make_projection(100, 3, 5)


def _logits(seed):
    return randn(seed, BATCH, 10, scale=3.0), randn(seed + 1, BATCH, 10, scale=3.0)


def _hint_feats(seed):
    return randn(seed, BATCH, 4, 4, 3), randn(seed + 1, BATCH, 4, 4, 5)


def _maps(seed):
    return relu_feat(seed, BATCH, 5, 6, 3), relu_feat(seed + 1, BATCH, 5, 6, 7)


def _embeddings(seed):
    return randn(seed, BATCH, 6), randn(seed + 1, BATCH, 3, 3)


# name -> (loss(student, teacher, where), inputs(seed) with batch BATCH,
#          reference(student, teacher, rows) on the sub-batch selected by boolean ``rows``).
CASES = {
    "kd": (
        lambda s, t, where: losses.kd_loss(s, t, temperature=2.0, where=where),
        _logits,
        lambda s, t, rows: ref_kd(s[rows], t[rows], 2.0),
    ),
    "kd_standardized": (
        lambda s, t, where: losses.kd_loss(s, t, temperature=2.0, standardize=True, where=where),
        _logits,
        lambda s, t, rows: ref_kd(s[rows], t[rows], 2.0, standardize=True),
    ),
    "dkd": (
        # Masked-out rows carry an out-of-range label, which must be harmless.
        lambda s, t, where: losses.dkd_loss(
            s, t, jnp.where(where, LABELS, -1), alpha=2.0, beta=3.0, where=where
        ),
        _logits,
        lambda s, t, rows: ref_dkd(s[rows], t[rows], LABELS[rows], 2.0, 3.0, 4.0),
    ),
    "fitnets": (
        lambda s, t, where: losses.fitnets_loss(s, t, PROJECTION, where=where),
        _hint_feats,
        lambda s, t, rows: ref_fitnets(s[rows], t[rows], **PROJECTION),
    ),
    "attention_transfer": (
        lambda s, t, where: losses.attention_transfer_loss(s, t, where=where),
        _maps,
        lambda s, t, rows: ref_at(s[rows], t[rows], 2.0),
    ),
    "rkd": (
        lambda s, t, where: losses.rkd_loss(s, t, where=where),
        _embeddings,
        lambda s, t, rows: ref_rkd(s[rows], t[rows], 25.0, 50.0)[0],
    ),
    "pkt": (
        lambda s, t, where: losses.pkt_loss(s, t, where=where),
        _embeddings,
        lambda s, t, rows: ref_pkt(s[rows], t[rows], 1e-7)[0],
    ),
    "similarity_preserving": (
        lambda s, t, where: losses.similarity_preserving_loss(s, t, where=where),
        _embeddings,
        lambda s, t, rows: ref_sp(s[rows], t[rows])[0],
    ),
}
RELATIONAL = ("rkd", "pkt", "similarity_preserving")
ALL_VALID = np.ones(BATCH, dtype=bool)
WHERE = np.array([True, False, True, True, False, True, False, True])


@functools.cache
def loss_and_grad(name):
    """Jitted ``((sum of loss, per-example loss), d sum / d student)`` for a case.

    Cached so that every test of a case shares one compilation.
    """
    fn = CASES[name][0]

    def total(s, t, where):
        loss = fn(s, t, where)
        return jnp.sum(loss), loss

    return jax.jit(jax.value_and_grad(total, has_aux=True))


def run_case(name, s, t, where):
    (_, loss), grad = loss_and_grad(name)(s, t, where)
    return np.asarray(loss), np.asarray(grad)


# ---------------------------------------------------------------------------------------
# Comparisons with the references.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_on_shared_case(name):
    _, make_inputs, reference = CASES[name]
    s, t = make_inputs(1)
    loss, grad = run_case(name, s, t, ALL_VALID)
    assert_close(loss, reference(s, t, ALL_VALID))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize(
    ("seed", "batch", "classes", "temperature"),
    [(0, 1, 2, 1.0), (2, 16, 100, 0.5)],
)
def test_kd_matches_reference(seed, batch, classes, temperature, standardize):
    s = randn(seed, batch, classes, scale=3.0)
    t = randn(seed + 1, batch, classes, scale=3.0)
    fn = jax.jit(
        functools.partial(losses.kd_loss, temperature=temperature, standardize=standardize)
    )
    assert_close(fn(s, t), ref_kd(s, t, temperature, standardize))


def test_kd_identical_logits_at_unit_temperature_is_zero():
    s, _ = _logits(2)
    loss, grad = run_case("kd", s, s, ALL_VALID)
    np.testing.assert_allclose(loss, 0.0, atol=ATOL)
    np.testing.assert_allclose(grad, 0.0, atol=ATOL)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 8.0])
def test_kd_gradient_is_temperature_times_probability_gap(temperature):
    s, t = _logits(3)
    fn = functools.partial(losses.kd_loss, temperature=temperature)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, t))))(s)
    s64, t64 = np.float64(s), np.float64(t)
    expected = temperature * (np_softmax(s64 / temperature) - np_softmax(t64 / temperature))
    np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)


def test_kd_standardize_is_invariant_to_affine_logit_maps():
    s, t = _logits(4)
    loss, _ = run_case("kd_standardized", s, t, ALL_VALID)
    shifted, _ = run_case("kd_standardized", 3.0 * s - 7.0, 0.5 * t + 2.0, ALL_VALID)
    np.testing.assert_allclose(shifted, loss, rtol=RTOL, atol=ATOL)


def test_kd_standardize_constant_logits_is_finite():
    s, t = _logits(5)
    s[2] = 3.0
    loss, grad = run_case("kd_standardized", s, t, ALL_VALID)
    assert np.all(np.isfinite(grad))
    # Constant logits standardise to zeros, i.e. a uniform student distribution.
    s[2] = 0.0
    assert_close(loss, ref_kd(s, t, 2.0, standardize=True))


def test_kd_standardize_divides_by_the_unbiased_standard_deviation():
    """Logits (0, 1, 2): mean 1, unbiased std sqrt(2 / 2) = 1, so the z-scores are (-1, 0, 1).

    With the population std sqrt(2 / 3) they would be (-1.22, 0, 1.22) instead.
    """
    s = np.array([[0.0, 1.0, 2.0]], np.float32)
    t = np.array([[5.0, 1.0, 3.0]], np.float32)  # z-scores (1, -1, 0)
    z_s = np.array([-1.0, 0.0, 1.0]) / (1.0 + 1e-7)
    z_t = np.array([1.0, -1.0, 0.0]) / (1.0 + 1e-7)
    p_s, p_t = np_softmax(z_s / 2.0), np_softmax(z_t / 2.0)
    expected = 4.0 * np.sum(p_t * np.log(p_t / p_s))
    loss = losses.kd_loss(s, t, temperature=2.0, standardize=True)
    np.testing.assert_allclose(loss, [expected], rtol=RTOL)


@pytest.mark.parametrize(
    ("seed", "batch", "classes", "alpha", "beta", "temperature"),
    [(0, 8, 10, 1.0, 8.0, 4.0), (1, 8, 10, 1.0, 1.0, 1.0), (2, 5, 2, 0.5, 2.0, 2.0)],
)
def test_dkd_matches_reference(seed, batch, classes, alpha, beta, temperature):
    s = randn(seed, batch, classes, scale=3.0)
    t = randn(seed + 1, batch, classes, scale=3.0)
    labels = np.random.default_rng(seed).integers(0, classes, size=batch)
    fn = jax.jit(
        functools.partial(losses.dkd_loss, alpha=alpha, beta=beta, temperature=temperature)
    )
    assert_close(fn(s, t, labels), ref_dkd(s, t, labels, alpha, beta, temperature))


def test_dkd_target_class_decomposition_of_kd():
    """KD = TCKD + (1 - p^t_target) NCKD (Zhao et al. 2022), all scaled by T^2.

    Run in float64 so that the identity holds to 1e-10; the float32 comparison of DKD with
    the reference is covered by the other DKD tests.
    """
    temperature = 4.0
    with jax.enable_x64(True):
        s, t = (np.float64(x) for x in _logits(6))
        dkd = jax.jit(losses.dkd_loss, static_argnames=("alpha", "beta", "temperature"))
        tckd = np.asarray(dkd(s, t, LABELS, alpha=1.0, beta=0.0, temperature=temperature))
        nckd = np.asarray(dkd(s, t, LABELS, alpha=0.0, beta=1.0, temperature=temperature))
        kd = np.asarray(jax.jit(functools.partial(losses.kd_loss, temperature=temperature))(s, t))
    assert tckd.dtype == nckd.dtype == kd.dtype == np.float64
    ref_tckd, ref_nckd = ref_dkd_parts(s, t, LABELS, temperature)
    np.testing.assert_allclose(tckd, ref_tckd, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nckd, ref_nckd, rtol=1e-10, atol=1e-12)
    p_target = np_softmax(t / temperature)[np.arange(BATCH), LABELS]
    np.testing.assert_allclose(kd, tckd + (1.0 - p_target) * nckd, rtol=1e-10, atol=1e-12)


def test_dkd_extreme_teacher_confidence_is_finite():
    s, _ = _logits(7)
    t = np.zeros_like(s)
    t[np.arange(BATCH), LABELS] = 500.0
    loss, grad = run_case("dkd", s, t, ALL_VALID)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    ("seed", "student_shape", "teacher_shape"),
    [(0, (4, 6), (4, 3)), (1, (3, 5, 5, 4), (3, 5, 5, 8))],
)
def test_fitnets_matches_reference(seed, student_shape, teacher_shape):
    s = randn(seed, *student_shape)
    t = randn(seed + 1, *teacher_shape)
    projection = make_projection(seed + 2, student_shape[-1], teacher_shape[-1])
    assert_close(jax.jit(losses.fitnets_loss)(s, t, projection), ref_fitnets(s, t, **projection))


def test_init_projection_shapes_and_statistics():
    projection = losses.init_projection(jax.random.key(0), 256, 128)
    assert projection["kernel"].shape == (256, 128)
    assert projection["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(projection["bias"], np.zeros(128))
    # LeCun normal: variance 1 / fan_in (up to sampling error of 32768 draws).
    np.testing.assert_allclose(np.var(projection["kernel"]), 1.0 / 256, rtol=0.05)


@pytest.mark.parametrize(
    ("seed", "student_shape", "teacher_shape", "p"),
    [(0, (3, 4, 4, 5), (3, 4, 4, 9), 1.0), (1, (2, 7, 3, 6), (2, 7, 3, 2), 4.0)],
)
def test_attention_transfer_matches_reference(seed, student_shape, teacher_shape, p):
    s = relu_feat(seed, *student_shape)
    t = relu_feat(seed + 1, *teacher_shape)
    fn = jax.jit(functools.partial(losses.attention_transfer_loss, p=p))
    assert_close(fn(s, t), ref_at(s, t, p))


def test_attention_transfer_uses_absolute_activations():
    s = randn(0, 2, 3, 3, 4)
    t = randn(1, 2, 3, 3, 4)
    fn = jax.jit(functools.partial(losses.attention_transfer_loss, p=3.0))
    loss = fn(s, t)
    assert_close(loss, ref_at(s, t, 3.0))
    np.testing.assert_array_equal(loss, fn(np.abs(s), -np.abs(t)))


@pytest.mark.parametrize(
    ("seed", "batch", "weights"),
    [(0, 2, (25.0, 50.0)), (1, 5, (1.0, 0.0)), (2, 7, (0.0, 1.0))],
)
def test_rkd_matches_reference(seed, batch, weights):
    s = randn(seed, batch, 4, 2)
    t = randn(seed + 1, batch, 5)
    distance_weight, angle_weight = weights
    fn = jax.jit(
        functools.partial(
            losses.rkd_loss, distance_weight=distance_weight, angle_weight=angle_weight
        )
    )
    per_example, batch_loss = ref_rkd(s, t, distance_weight, angle_weight)
    loss = fn(s, t)
    assert_close(loss, per_example)
    np.testing.assert_allclose(np.mean(loss), batch_loss, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("seed", "batch", "eps"), [(0, 2, 1e-7), (2, 9, 1e-3)])
def test_pkt_matches_reference(seed, batch, eps):
    s = randn(seed, batch, 7)
    t = randn(seed + 1, batch, 2, 5)
    fn = jax.jit(functools.partial(losses.pkt_loss, eps=eps))
    per_row, official = ref_pkt(s, t, eps)
    loss = fn(s, t)
    assert_close(loss, per_row)
    np.testing.assert_allclose(np.mean(loss) / batch, official, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("seed", "student_shape", "teacher_shape"),
    [(0, (2, 3), (2, 8)), (1, (6, 4, 4, 3), (6, 2, 2, 10))],
)
def test_similarity_preserving_matches_reference(seed, student_shape, teacher_shape):
    s = relu_feat(seed, *student_shape)
    t = relu_feat(seed + 1, *teacher_shape)
    per_example, batch_loss = ref_sp(s, t)
    loss = jax.jit(losses.similarity_preserving_loss)(s, t)
    assert_close(loss, per_example)
    np.testing.assert_allclose(np.mean(loss), batch_loss, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", RELATIONAL)
def test_relational_mean_is_batch_loss(name):
    s, t = CASES[name][1](8)
    loss, _ = run_case(name, s, t, ALL_VALID)
    if name == "rkd":
        expected = ref_rkd(s, t, 25.0, 50.0)[1]
    elif name == "pkt":  # The official value averages the row terms over B^2 entries.
        expected = ref_pkt(s, t, 1e-7)[1] * BATCH
    else:
        expected = ref_sp(s, t)[1]
    np.testing.assert_allclose(np.mean(loss), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------
# Gradients, checked against float64 finite differences.
# ---------------------------------------------------------------------------------------

# All cases take (4, 10) arrays so that the eager helpers of check_grads compile once.
GRAD_CASES = {
    "kd": lambda s, t: losses.kd_loss(s, t, temperature=3.0),
    "kd_standardized": lambda s, t: losses.kd_loss(s, t, temperature=3.0, standardize=True),
    "dkd": lambda s, t: losses.dkd_loss(s, t, LABELS[:4], alpha=1.5, beta=2.0),
    "fitnets": lambda s, t: losses.fitnets_loss(
        s.reshape(4, 5, 2), t.reshape(4, 5, 2), make_projection(9, 2, 2)
    ),
    "attention_transfer": lambda s, t: losses.attention_transfer_loss(
        s.reshape(4, 5, 1, 2), t.reshape(4, 5, 1, 2)
    ),
    "rkd": lambda s, t: losses.rkd_loss(s, t, distance_weight=1.0, angle_weight=2.0),
    "pkt": losses.pkt_loss,
    "similarity_preserving": losses.similarity_preserving_loss,
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        s = np.float64(randn(10, 4, 10, scale=2.0))
        t = np.float64(randn(11, 4, 10, scale=2.0))
        fn = jax.jit(GRAD_CASES[name])
        assert fn(s, t).dtype == jnp.float64
        check_grads(fn, (s, t), order=1, modes=["rev"])


def test_fitnets_gradient_wrt_projection():
    with jax.enable_x64(True):
        s = np.float64(randn(0, 4, 5, 2))
        t = np.float64(randn(1, 4, 5, 2))
        projection = jax.tree.map(np.float64, make_projection(2, 2, 2))
        fn = jax.jit(lambda proj: losses.fitnets_loss(s, t, proj))
        check_grads(fn, (projection,), order=1, modes=["rev"])


# ---------------------------------------------------------------------------------------
# Masking and degenerate inputs.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_where_matches_sub_batch(name):
    _, make_inputs, reference = CASES[name]
    s, t = make_inputs(20)
    # Masked-out rows must have no influence, even as NaN/inf padding.
    s[~WHERE] = np.nan
    t[~WHERE] = np.inf
    loss, grad = run_case(name, s, t, WHERE)
    np.testing.assert_array_equal(loss[~WHERE], 0.0)
    assert_close(loss[WHERE], reference(s, t, WHERE))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~WHERE], 0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_all_masked_batch_is_zero_with_zero_gradients(name):
    s, t = CASES[name][1](30)
    loss, grad = run_case(name, s, t, np.zeros(BATCH, dtype=bool))
    np.testing.assert_array_equal(loss, 0.0)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("name", RELATIONAL)
def test_relational_single_valid_example_is_zero(name):
    s, t = CASES[name][1](40)
    where = np.zeros(BATCH, dtype=bool)
    where[2] = True
    loss, grad = run_case(name, s, t, where)
    np.testing.assert_allclose(loss, 0.0, atol=ATOL)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", [*RELATIONAL, "attention_transfer"])
def test_zero_inputs_give_finite_loss_and_gradients(name):
    _, make_inputs, reference = CASES[name]
    s, t = make_inputs(50)
    s[1] = 0.0
    t[3] = 0.0
    loss, grad = run_case(name, s, t, ALL_VALID)
    assert np.all(np.isfinite(grad))
    assert_close(loss, reference(s, t, ALL_VALID))


def test_rkd_duplicate_embeddings_are_finite():
    s, t = _embeddings(60)
    s[2] = s[0]
    loss, grad = run_case("rkd", s, t, ALL_VALID)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


# ---------------------------------------------------------------------------------------
# Argument validation.
# ---------------------------------------------------------------------------------------

_L = randn(0, 4, 5)
_Y = np.zeros(4, dtype=np.int32)
_F = randn(0, 4, 3, 3, 2)
_E = randn(0, 4, 6)

BAD_INPUTS = [
    (lambda: losses.kd_loss(_L, randn(1, 4, 6)), "teacher_logits"),
    (lambda: losses.kd_loss(_L[0], _L[0]), "student_logits"),
    (lambda: losses.kd_loss(_L, _L, temperature=0.0), "temperature"),
    (lambda: losses.kd_loss(_L, _L, temperature=-1.0), "temperature"),
    (lambda: losses.kd_loss(_L, _L, where=np.ones(3, dtype=bool)), "where"),
    (lambda: losses.kd_loss(_L, _L, where=np.ones(4, dtype=np.int32)), "where"),
    (
        lambda: losses.kd_loss(_L[:, :1], _L[:, :1], standardize=True),
        "student_logits must have at least 2 classes for standardize=True",
    ),
    (lambda: losses.dkd_loss(_L, _L, np.zeros(4)), "labels"),
    (lambda: losses.dkd_loss(_L, _L, _Y[:3]), "labels"),
    (lambda: losses.dkd_loss(_L[:, :1], _L[:, :1], _Y), "student_logits must have at least 2"),
    (lambda: losses.dkd_loss(_L, _L, _Y, alpha=-1.0), "alpha"),
    (lambda: losses.dkd_loss(_L, _L, _Y, beta=-1.0), "beta"),
    (lambda: losses.dkd_loss(_L, _L, _Y, temperature=0.0), "temperature"),
    (lambda: losses.dkd_loss(_L, _L.T, _Y), "teacher_logits"),
    (lambda: losses.init_projection(jax.random.key(0), 0, 3), "student_channels"),
    (lambda: losses.init_projection(jax.random.key(0), 2, 3.0), "teacher_channels"),
    (lambda: losses.project({"kernel": np.ones((2, 3))}, _F), "projection"),
    (lambda: losses.project({"kernel": np.ones(2), "bias": np.ones(3)}, _F), "kernel"),
    (lambda: losses.project({"kernel": np.ones((2, 3)), "bias": np.ones(2)}, _F), "bias"),
    (lambda: losses.project(make_projection(0, 5, 3), _F), "feat"),
    (
        lambda: losses.fitnets_loss(_F, randn(1, 4, 2, 3, 3), make_projection(0, 2, 3)),
        r"projected student_feat shape \(4, 3, 3, 3\) and teacher_feat shape \(4, 2, 3, 3\)",
    ),
    (lambda: losses.fitnets_loss(_F, _F, make_projection(0, 2, 3)), "teacher_feat shape"),
    (lambda: losses.fitnets_loss(_F[0, 0, 0], _F, make_projection(0, 2, 2)), "student_feat"),
    (lambda: losses.attention_transfer_loss(_E, _E), "student_feat"),
    (
        lambda: losses.attention_transfer_loss(_F, randn(1, 4, 3, 2, 2)),
        r"student_feat shape \(4, 3, 3, 2\) and teacher_feat shape \(4, 3, 2, 2\)",
    ),
    (lambda: losses.attention_transfer_loss(_F, _F, p=0.0), "p must"),
    (lambda: losses.rkd_loss(_E, randn(1, 3, 6)), "teacher_emb"),
    (lambda: losses.rkd_loss(_E[:1], _E[:1]), "student_emb"),
    (lambda: losses.rkd_loss(_E, _E, distance_weight=-1.0), "distance_weight"),
    (lambda: losses.rkd_loss(_E, _E, angle_weight=-1.0), "angle_weight"),
    (lambda: losses.rkd_loss(_E, _E, where=np.ones((4, 1), dtype=bool)), "where"),
    (lambda: losses.pkt_loss(_E[0], _E[0]), "student_emb"),
    (lambda: losses.pkt_loss(_E, _E, eps=0.0), "eps"),
    (lambda: losses.similarity_preserving_loss(_E, randn(1, 5, 6)), "teacher_feat"),
]


@pytest.mark.parametrize(("call", "match"), BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


_NAN_CASES = {
    "kd": (losses.kd_loss, "logits", _L),
    "dkd": (functools.partial(losses.dkd_loss, labels=_Y), "logits", _L),
    "fitnets": (
        lambda s, t, where=None: losses.fitnets_loss(s, t, make_projection(0, 2, 2), where=where),
        "feat",
        _F,
    ),
    "attention_transfer": (losses.attention_transfer_loss, "feat", _F),
    "rkd": (losses.rkd_loss, "emb", _E),
    "pkt": (losses.pkt_loss, "emb", _E),
    "similarity_preserving": (losses.similarity_preserving_loss, "feat", _E),
}


@pytest.mark.parametrize("name", sorted(_NAN_CASES))
@pytest.mark.parametrize("bad", ["student", "teacher"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_concrete_non_finite_input_raises_naming_argument(name, bad, value):
    fn, suffix, x = _NAN_CASES[name]
    poisoned = x.copy()
    poisoned[2].flat[1] = value
    args = (poisoned, x) if bad == "student" else (x, poisoned)
    pattern = rf"{bad}_{suffix} holds NaN or inf in 1 example\(s\) of 4 \(batch indices \[2\]\)"
    with pytest.raises(ValueError, match=pattern):
        fn(*args)
    # Outside the mask, non-finite padding is accepted and leaves the others unchanged.
    where = np.array([True, True, False, True])
    masked = np.asarray(fn(*args, where=where))
    np.testing.assert_array_equal(masked[2], 0.0)
    assert np.all(np.isfinite(masked))


def test_non_finite_logits_under_jit_propagate_without_a_check():
    s, t = _L.copy(), _L[::-1].copy()
    s[1, 0] = np.nan
    loss = np.asarray(jax.jit(losses.kd_loss)(s, t))
    assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(loss, 1)))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(losses.kd_loss(x, t))))(s)
    assert np.all(np.isnan(grad[1]))


def test_concrete_arrays_closed_over_by_jit_are_checked_at_trace_time():
    teacher = jnp.asarray(_L[::-1])
    fn = jax.jit(lambda s, scale: scale * losses.kd_loss(s, teacher))
    assert_close(fn(_L, 1.0), ref_kd(_L, _L[::-1], 4.0))
    poisoned = teacher.at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"teacher_logits holds NaN or inf"):
        jax.jit(lambda s: losses.kd_loss(s, poisoned))(_L)


# ---------------------------------------------------------------------------------------
# Logit losses over any leading shape: one value per token of (B, T, C) logits.
# ---------------------------------------------------------------------------------------

_TOKEN_LABELS = np.array([[3, 0, 4], [1, 1, 2]], dtype=np.int32)
_TOKEN_WHERE = np.array([[True, False, True], [True, True, False]])

# name -> (loss(s, t, labels, where), numpy reference on (N, C) rows).
TOKEN_CASES = {
    "kd": (
        lambda s, t, y, where: losses.kd_loss(s, t, temperature=2.0, where=where),
        lambda s, t, y: ref_kd(s, t, 2.0),
    ),
    "kd_standardized": (
        lambda s, t, y, where: losses.kd_loss(s, t, temperature=2.0, standardize=True, where=where),
        lambda s, t, y: ref_kd(s, t, 2.0, standardize=True),
    ),
    "dkd": (
        lambda s, t, y, where: losses.dkd_loss(s, t, y, alpha=2.0, beta=3.0, where=where),
        lambda s, t, y: ref_dkd(s, t, y, 2.0, 3.0, 4.0),
    ),
}


@pytest.mark.parametrize("name", sorted(TOKEN_CASES))
def test_per_token_logit_losses_match_reference_and_flattened_rows(name):
    fn, ref = TOKEN_CASES[name]
    s, t = randn(30, 2, 3, 5, scale=3.0), randn(31, 2, 3, 5, scale=3.0)
    per_token = np.asarray(fn(s, t, _TOKEN_LABELS, _TOKEN_WHERE))
    assert per_token.shape == (2, 3) and per_token.dtype == np.float32
    rows = _TOKEN_WHERE.reshape(-1)
    flat = fn(s.reshape(6, 5), t.reshape(6, 5), _TOKEN_LABELS.reshape(6), rows)
    np.testing.assert_allclose(per_token.reshape(6), flat, rtol=1e-6, atol=0)
    expected = np.zeros(6)
    expected[rows] = ref(
        s.reshape(6, 5)[rows], t.reshape(6, 5)[rows], _TOKEN_LABELS.reshape(6)[rows]
    )
    assert_close(per_token, expected.reshape(2, 3))
    # Without a mask every token counts.
    all_rows = ref(s.reshape(6, 5), t.reshape(6, 5), _TOKEN_LABELS.reshape(6)).reshape(2, 3)
    assert_close(fn(s, t, _TOKEN_LABELS, None), all_rows)


@pytest.mark.parametrize("name", sorted(TOKEN_CASES))
def test_masked_tokens_with_extreme_logits_change_nothing(name):
    fn, _ = TOKEN_CASES[name]
    s, t = randn(32, 2, 3, 5, scale=3.0), randn(33, 2, 3, 5, scale=3.0)
    wild_s, wild_t, wild_y = s.copy(), t.copy(), _TOKEN_LABELS.copy()
    wild_s[~_TOKEN_WHERE] = np.float32(3e38) * np.sign(randn(34, 2, 5))
    wild_t[~_TOKEN_WHERE] = -np.float32(3e38)
    wild_y[~_TOKEN_WHERE] = 99  # out of range, as padding labels may be

    def total(s, t, y):
        return jnp.sum(fn(s, t, y, _TOKEN_WHERE)), fn(s, t, y, _TOKEN_WHERE)

    grad = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))
    (g_s, g_t), loss = grad(s, t, _TOKEN_LABELS)
    (wild_g_s, wild_g_t), wild_loss = grad(wild_s, wild_t, wild_y)
    np.testing.assert_array_equal(wild_loss, loss)
    np.testing.assert_array_equal(wild_g_s, g_s)
    np.testing.assert_array_equal(wild_g_t, g_t)
    np.testing.assert_array_equal(np.asarray(loss)[~_TOKEN_WHERE], 0.0)
    np.testing.assert_array_equal(np.asarray(g_s)[~_TOKEN_WHERE], 0.0)
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t))


@pytest.mark.parametrize("name", sorted(TOKEN_CASES))
@pytest.mark.parametrize("bad", ["student", "teacher"])
def test_concrete_non_finite_token_raises_unless_masked(name, bad):
    fn, _ = TOKEN_CASES[name]
    s, t = randn(35, 2, 3, 5), randn(36, 2, 3, 5)
    poisoned = (s if bad == "student" else t).copy()
    poisoned[1, 2, 4] = np.inf
    poisoned[0, 1, 0] = np.nan
    args = (poisoned, t) if bad == "student" else (s, poisoned)
    pattern = (
        rf"{bad}_logits holds NaN or inf in 2 of the 6 entries of leading shape \(2, 3\) "
        r"\(indices \[\[0, 1\], \[1, 2\]\]\)"
    )
    with pytest.raises(ValueError, match=pattern):
        fn(*args, _TOKEN_LABELS, None)
    with pytest.raises(ValueError, match=rf"{bad}_logits holds NaN or inf in 1 of the 6 entries"):
        fn(*args, _TOKEN_LABELS, np.array([[True, False, True], [True, True, True]]))
    masked = np.asarray(fn(*args, _TOKEN_LABELS, _TOKEN_WHERE))
    assert np.all(np.isfinite(masked)) and np.all(masked[~_TOKEN_WHERE] == 0.0)


def test_per_token_shapes_are_checked():
    s = randn(37, 2, 3, 5)
    with pytest.raises(ValueError, match=r"where must be a boolean array of shape \(2, 3\)"):
        losses.kd_loss(s, s, where=np.ones(2, dtype=bool))
    with pytest.raises(ValueError, match=r"labels must be an integer array of shape \(2, 3\)"):
        losses.dkd_loss(s, s, _TOKEN_LABELS[:, 0])
    with pytest.raises(ValueError, match=r"teacher_logits must have the same shape"):
        losses.kd_loss(s, s.reshape(6, 5))
