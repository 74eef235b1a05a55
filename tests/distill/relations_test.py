"""Tests for kdq.distill.relations against NumPy float64 formulas written from the papers."""

import functools

import jax
import numpy as np
import pytest

from kdq.distill import losses, relations

RTOL = 1e-5
ATOL = 1e-6
# Example 0 has padding inside and at the end, example 1 no valid token, example 2 all valid.
WHERE = np.array(
    [
        [True, True, False, True, False],
        [False, False, False, False, False],
        [True, True, True, True, True],
    ]
)


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(a, b):
    return float(np.sum(a * (np.log(a) - np.log(b))))


def relation_row(x, head, num_heads, query, keys):
    """MiniLMv2 relation of one query over the valid keys: softmax(A_h A_h^T / sqrt(d_r))."""
    head_dim = x.shape[-1] // num_heads
    a = x[:, head * head_dim : (head + 1) * head_dim]
    return np_softmax(a[keys] @ a[query] / np.sqrt(head_dim))


def ref_attention_relation(s, t, num_heads, where):
    """Mean over relation heads of KL(R_teacher || R_student), per valid query token."""
    s, t = np.float64(s), np.float64(t)
    loss = np.zeros(where.shape)
    for b in range(where.shape[0]):
        keys = np.flatnonzero(where[b])
        for i in keys:
            kls = [
                np_kl(
                    relation_row(t[b], h, num_heads, i, keys),
                    relation_row(s[b], h, num_heads, i, keys),
                )
                for h in range(num_heads)
            ]
            loss[b, i] = np.mean(kls)
    return loss


def ref_hidden(s, t, kernel, bias, where):
    projected = np.float64(s) @ np.float64(kernel) + np.float64(bias)
    return np.where(where, ((projected - np.float64(t)) ** 2).mean(axis=-1), 0.0)


def features(seed, width, scale=1.0):
    rng = np.random.default_rng(seed)
    return np.float32(rng.normal(size=(*WHERE.shape, width)) * scale)


def padded(x):
    """``x`` with NaN on the masked tokens."""
    x = x.copy()
    x[~WHERE] = np.nan
    return x


@pytest.mark.parametrize(
    ("student_width", "teacher_width", "num_heads"), [(8, 12, 4), (8, 4, 2), (3, 5, 1)]
)
def test_attention_relation_matches_reference_across_widths(
    student_width, teacher_width, num_heads
):
    s, t = features(0, student_width), features(1, teacher_width, scale=2.0)
    loss = jax.jit(
        functools.partial(relations.attention_relation_loss, num_relation_heads=num_heads)
    )(padded(s), padded(t), where=WHERE)
    assert loss.shape == WHERE.shape
    expected = ref_attention_relation(s, t, num_heads, WHERE)
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)


def test_attention_relation_without_mask_uses_every_token():
    s, t = features(2, 8), features(3, 4)
    everything = np.ones_like(WHERE)
    np.testing.assert_allclose(
        jax.jit(relations.attention_relation_loss)(s, t),
        ref_attention_relation(s, t, 4, everything),
        rtol=RTOL,
        atol=ATOL,
    )


def test_attention_relation_of_identical_relations_is_zero():
    s = features(4, 8)
    # Permuting channels within each head leaves every head's Gram matrix unchanged.
    permuted = s.reshape(*s.shape[:2], 4, 2)[..., ::-1].reshape(s.shape)
    loss = jax.jit(relations.attention_relation_loss)(s, permuted, where=WHERE)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_hidden_state_loss_matches_reference():
    s, t = features(5, 8), features(6, 4)
    projection = losses.init_projection(jax.random.PRNGKey(0), 8, 4)
    projection["bias"] = projection["bias"] + 0.5
    loss = relations.hidden_state_loss(padded(s), padded(t), projection, where=WHERE)
    expected = ref_hidden(s, t, projection["kernel"], projection["bias"], WHERE)
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["hidden", "attention_relation"])
def test_gradients_are_finite_and_zero_on_masked_tokens(name):
    s, t = padded(features(7, 8)), padded(features(8, 4))
    projection = losses.init_projection(jax.random.PRNGKey(1), 8, 4)

    def total(s, t):
        if name == "hidden":
            return relations.hidden_state_loss(s, t, projection, where=WHERE).sum()
        return relations.attention_relation_loss(s, t, num_relation_heads=2, where=WHERE).sum()

    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(s, t)
    for grad in grads:
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(grad[~WHERE], 0.0)
        assert np.any(grad[WHERE] != 0)


def test_attention_relation_gradient_pulls_the_student_towards_the_teacher():
    s, t = features(9, 8), features(10, 4, scale=2.0)

    @jax.jit
    def loss(x):
        return relations.attention_relation_loss(x, t, num_relation_heads=2, where=WHERE).sum()

    step = s - 0.05 * np.asarray(jax.jit(jax.grad(loss))(s))
    assert loss(step) < loss(s)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: relations.attention_relation_loss(np.zeros((3, 8)), np.zeros((3, 8))),
            r"student_feat must have rank 3 \(batch, tokens, channels\), got shape \(3, 8\)",
        ),
        (
            lambda: relations.attention_relation_loss(np.zeros((3, 5, 8)), np.zeros((3, 4, 8))),
            r"same batch and token axes, got student_feat shape \(3, 5, 8\) and teacher_feat",
        ),
        (
            lambda: relations.attention_relation_loss(
                np.zeros((3, 5, 8)), np.zeros((3, 5, 6)), num_relation_heads=4
            ),
            r"teacher_feat has 6 channels, not divisible by num_relation_heads=4",
        ),
        (
            lambda: relations.attention_relation_loss(
                np.zeros((3, 5, 8)), np.zeros((3, 5, 8)), num_relation_heads=0
            ),
            r"num_relation_heads must be a positive int, got 0",
        ),
        (
            lambda: relations.attention_relation_loss(
                np.zeros((3, 5, 8)), np.zeros((3, 5, 8)), where=np.ones((3,), bool)
            ),
            r"where must be a boolean array of shape \(3, 5\)",
        ),
        (
            lambda: relations.hidden_state_loss(
                np.zeros((3, 5, 8)),
                np.zeros((3, 5, 6)),
                losses.init_projection(jax.random.PRNGKey(0), 8, 4),
            ),
            r"projection maps student_feat of shape \(3, 5, 8\) to shape \(3, 5, 4\)",
        ),
        (
            lambda: relations.hidden_state_loss(
                np.zeros((3, 5, 8)),
                np.zeros((3, 5, 6)),
                losses.init_projection(jax.random.PRNGKey(0), 7, 6),
            ),
            r"feat must have 7 channels",
        ),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name", ["student_feat", "teacher_feat"])
def test_non_finite_valid_token_raises_naming_the_argument(name):
    feats = {"student_feat": features(11, 8), "teacher_feat": features(12, 4)}
    feats[name][2, 1, 0] = np.inf
    with pytest.raises(ValueError, match=rf"{name} holds NaN or inf.*indices \[\[2, 1\]\]"):
        relations.attention_relation_loss(**feats, num_relation_heads=2, where=WHERE)
