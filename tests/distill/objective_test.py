import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.distill import losses
from kdq.distill.objective import Objective
from kdq.distill.taps import apply_with_taps


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_ce(logits, labels):
    return -_log_softmax(logits)[np.arange(len(labels)), labels]


def _numpy_kd(s, t, temperature):
    log_p_t = _log_softmax(t / temperature)
    log_p_s = _log_softmax(s / temperature)
    return temperature**2 * (np.exp(log_p_t) * (log_p_t - log_p_s)).sum(-1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return {
        "s": rng.normal(size=(6, 5)).astype(np.float32),
        "t": rng.normal(size=(6, 5)).astype(np.float32) * 3,
        "labels": rng.integers(0, 5, size=6),
    }


def test_weighted_sum_of_ce_and_kd_matches_numpy(batch):
    objective = Objective.from_config(
        {"ce": {"weight": 0.3}, "kd": {"weight": 0.7, "temperature": 2.0}}
    )
    loss, metrics = jax.jit(
        lambda s, t, y: objective({}, student_logits=s, teacher_logits=t, labels=y)
    )(batch["s"], batch["t"], batch["labels"])
    ce = _numpy_ce(batch["s"], batch["labels"]).mean()
    kd = _numpy_kd(batch["s"], batch["t"], 2.0).mean()
    np.testing.assert_allclose(metrics["loss/ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.3 * ce + 0.7 * kd, rtol=1e-5)


def test_where_averages_over_valid_examples_only(batch):
    objective = Objective.from_config({"ce": {"weight": 1.0}})
    where = np.array([True, True, False, True, False, True])
    loss, _ = objective(
        {}, student_logits=batch["s"], teacher_logits=None, labels=batch["labels"], where=where
    )
    expected = _numpy_ce(batch["s"][where], batch["labels"][where]).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_ce_alone_needs_no_teacher():
    assert not Objective.from_config({"ce": {"weight": 1.0}}).needs_teacher
    assert Objective.from_config({"ce": {}, "kd": {"weight": 0.5}}).needs_teacher


def test_zero_weight_terms_are_dropped():
    objective = Objective.from_config({"ce": {"weight": 1.0}, "kd": {"weight": 0.0}})
    assert [t.name for t in objective.terms] == ["ce"]
    assert not objective.needs_teacher


def test_named_feature_term_with_kind_and_taps():
    objective = Objective.from_config(
        {"hint": {"kind": "fitnets", "weight": 2.0, "student": "Dense_0", "teacher": "Conv_1"}}
    )
    assert objective.student_taps == ("Dense_0",)
    assert objective.teacher_taps == ("Conv_1",)
    params = objective.init_params(
        jax.random.PRNGKey(0),
        {"Dense_0": jax.ShapeDtypeStruct((4, 2, 2, 8), jnp.float32)},
        {"Conv_1": jax.ShapeDtypeStruct((4, 2, 2, 16), jnp.float32)},
    )
    assert params["hint"]["kernel"].shape == (8, 16)
    assert params["hint"]["bias"].shape == (16,)


def test_mismatched_feature_shapes_name_both_paths_and_shapes():
    objective = Objective.from_config({"fitnets": {"student": "Dense_0", "teacher": "Conv_1"}})
    with pytest.raises(
        ValueError, match=r"'Dense_0' of shape \(4, 32\).*'Conv_1' of shape \(4, 2, 2, 16\)"
    ):
        objective.init_params(
            jax.random.PRNGKey(0),
            {"Dense_0": jax.ShapeDtypeStruct((4, 32), jnp.float32)},
            {"Conv_1": jax.ShapeDtypeStruct((4, 2, 2, 16), jnp.float32)},
        )


def test_unknown_loss_kind_lists_known_kinds():
    with pytest.raises(ValueError, match=r"unknown kind='nope'.*'kd', 'dkd'"):
        Objective.from_config({"nope": {"weight": 1.0}})


def test_feature_term_without_taps_is_an_error():
    with pytest.raises(ValueError, match=r"needs 'student' and 'teacher'.*teacher=None"):
        Objective.from_config({"rkd": {"student": "Dense_0"}})


def test_negative_weight_is_an_error():
    with pytest.raises(ValueError, match=r"weight >= 0, got weight=-1"):
        Objective.from_config({"ce": {"weight": -1}})


def test_empty_objective_is_an_error():
    with pytest.raises(ValueError, match="at least one loss term"):
        Objective.from_config({})


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), True])
def test_non_finite_or_bool_weight_is_an_error(weight):
    with pytest.raises(ValueError, match=r"loss term 'kd' needs a finite weight >= 0"):
        Objective.from_config({"ce": {}, "kd": {"weight": weight}})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_option_is_an_error(value):
    with pytest.raises(ValueError, match=rf"loss term 'kd' \(kd\) option temperature={value} must"):
        Objective.from_config({"kd": {"temperature": value}})


def test_unknown_option_lists_the_options():
    with pytest.raises(
        ValueError,
        match=r"loss term 'kd' \(kd\) has no option 'temprature'; its options are "
        r"\['weight', 'temperature', 'standardize'\]",
    ):
        Objective.from_config({"kd": {"temprature": 4.0}})


def test_bad_option_value_names_the_term(batch):
    objective = Objective.from_config({"soft": {"kind": "kd", "temperature": -1.0}})
    with pytest.raises(ValueError, match=r"loss term 'soft' \(kd\): temperature must be > 0"):
        objective({}, student_logits=batch["s"], teacher_logits=batch["t"], labels=batch["labels"])


def test_labels_must_be_one_per_example(batch):
    objective = Objective.from_config({"ce": {}})
    with pytest.raises(ValueError, match=r"labels of shape \(6, 1\) do not match .* \(6, 5\)"):
        jax.eval_shape(
            lambda s, y: objective({}, student_logits=s, teacher_logits=None, labels=y),
            batch["s"],
            batch["labels"][:, None],
        )


def test_teacher_logits_must_match_the_student(batch):
    objective = Objective.from_config({"kd": {}})
    with pytest.raises(ValueError, match=r"teacher logits of shape \(6, 4\) do not match"):
        objective(
            {}, student_logits=batch["s"], teacher_logits=batch["t"][:, :4], labels=batch["labels"]
        )


def test_per_token_logits_average_over_valid_tokens_and_features_over_valid_examples():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(3, 4, 5)).astype(np.float32) * 2
    t = rng.normal(size=(3, 4, 5)).astype(np.float32) * 2
    labels = rng.integers(0, 5, size=(3, 4))
    where = np.array([[True, False, True, True], [False] * 4, [False, True, False, False]])
    s_feat = rng.normal(size=(3, 6)).astype(np.float32)
    t_feat = rng.normal(size=(3, 2)).astype(np.float32)
    objective = Objective.from_config(
        {
            "ce": {"weight": 0.5},
            "kd": {"weight": 0.25, "temperature": 2.0},
            "dkd": {"weight": 0.125},
            "hint": {"kind": "fitnets", "weight": 2.0, "student": "s", "teacher": "t"},
        }
    )
    params = objective.init_params(jax.random.PRNGKey(0), {"s": s_feat}, {"t": t_feat})
    loss, metrics = jax.jit(
        lambda p, s, t, y, w: objective(
            p,
            student_logits=s,
            teacher_logits=t,
            labels=y,
            where=w,
            student_features={"s": s_feat},
            teacher_features={"t": t_feat},
        )
    )(params, s, t, labels, where)
    rows = where.reshape(-1)
    flat_s, flat_t, flat_y = s.reshape(12, 5)[rows], t.reshape(12, 5)[rows], labels.reshape(12)
    ce = _numpy_ce(flat_s, flat_y[rows]).mean()
    kd = _numpy_kd(flat_s, flat_t, 2.0).mean()
    dkd = np.asarray(losses.dkd_loss(flat_s, flat_t, flat_y[rows])).mean()
    # Example 1 has no valid token: the per-example hint loss averages examples 0 and 2.
    kernel, bias = np.asarray(params["hint"]["kernel"]), np.asarray(params["hint"]["bias"])
    hint = ((s_feat[[0, 2]] @ kernel + bias - t_feat[[0, 2]]) ** 2).mean()
    np.testing.assert_allclose(metrics["loss/ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/dkd"], dkd, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/hint"], hint, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * ce + 0.25 * kd + 0.125 * dkd + 2.0 * hint, rtol=1e-5)


def test_per_token_logits_without_where_count_every_token():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(2, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 3))
    objective = Objective.from_config({"ce": {"weight": 1.0}})
    loss, _ = objective({}, student_logits=s, teacher_logits=None, labels=labels)
    np.testing.assert_allclose(
        loss, _numpy_ce(s.reshape(6, 4), labels.reshape(6)).mean(), rtol=1e-5
    )


@pytest.mark.parametrize(
    "where", [np.ones(2, bool), np.ones((2, 3), np.int32), np.ones((3, 2), bool)]
)
def test_where_must_be_a_boolean_mask_of_the_labels_shape(where):
    objective = Objective.from_config({"ce": {"weight": 1.0}})
    s = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(
        ValueError, match=r"where must be a boolean mask of the labels' shape \(2, 3\)"
    ):
        objective(
            {}, student_logits=s, teacher_logits=None, labels=np.zeros((2, 3), int), where=where
        )


# ---------------------------------------------------------------------------------------
# Language-model terms: per-token divergences and token feature terms.
# ---------------------------------------------------------------------------------------


def _numpy_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def _numpy_softmax(z):
    return np.exp(_log_softmax(np.float64(z)))


TOKEN_MASK = np.array([[True, True, False, True], [False, False, False, False], [True] * 4])


def test_lm_divergence_terms_average_over_valid_tokens():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(3, 4, 6)).astype(np.float32) * 2
    t = rng.normal(size=(3, 4, 6)).astype(np.float32) * 2
    labels = rng.integers(0, 6, size=(3, 4))
    objective = Objective.from_config(
        {
            "jsd": {"weight": 0.5, "beta": 0.2, "temperature": 2.0},
            "rkl": {"kind": "reverse_kl", "weight": 2.0},
            "tv": {"kind": "total_variation"},
        }
    )
    loss, metrics = objective(
        {}, student_logits=s, teacher_logits=t, labels=labels, where=TOKEN_MASK
    )
    p, q = _numpy_softmax(t[TOKEN_MASK]), _numpy_softmax(s[TOKEN_MASK])
    p2, q2 = _numpy_softmax(t[TOKEN_MASK] / 2), _numpy_softmax(s[TOKEN_MASK] / 2)
    m = 0.2 * p2 + 0.8 * q2
    jsd = (4 * (0.2 * _numpy_kl(p2, m) + 0.8 * _numpy_kl(q2, m))).mean()
    rkl = _numpy_kl(q, p).mean()
    tv = (0.5 * np.abs(p - q).sum(-1)).mean()
    np.testing.assert_allclose(metrics["loss/jsd"], jsd, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/rkl"], rkl, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/tv"], tv, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * jsd + 2.0 * rkl + tv, rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("forward_kl", "['weight', 'temperature']"),
        ("jsd", "['weight', 'beta', 'temperature']"),
        ("skew_kl", "['weight', 'alpha', 'temperature']"),
        ("skew_reverse_kl", "['weight', 'alpha', 'temperature']"),
    ],
)
def test_lm_divergence_options_are_listed(kind, options):
    message = f"has no option 'gamma'; its options are {options}"
    with pytest.raises(ValueError, match=re.escape(message)):
        Objective.from_config({kind: {"gamma": 1.0}})


def test_lm_divergence_option_errors_name_the_term():
    objective = Objective.from_config({"gkd": {"kind": "jsd", "beta": 2.0}})
    s = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"loss term 'gkd' \(jsd\): beta must be a number in"):
        objective({}, student_logits=s, teacher_logits=s, labels=np.zeros((2, 3), int))


class _QKV(nn.Module):
    """A tiny model whose q, k, v projections are tappable, as in kdq's transformers."""

    width: int

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(self.width, use_bias=False, name=n)(x) for n in "qkv")
        return q + k + v


def _qkv_features(width, seed, x):
    model = _QKV(width)
    variables = model.init(jax.random.PRNGKey(seed), x)
    _, feats, _ = apply_with_taps(model, variables, x, taps=["q", "k", "v"])
    return {tap: np.asarray(f) for tap, f in feats.items()}


def _numpy_relation_kl(s, t, heads, keys):
    """Mean over heads of KL(R_t || R_s) per query of one (T, D) example, over `keys`."""

    def relations(x):
        x = np.float64(x[keys]).reshape(len(keys), heads, -1).transpose(1, 0, 2)
        scores = x @ x.transpose(0, 2, 1) / np.sqrt(x.shape[-1])
        return np.exp(_log_softmax(scores))

    return _numpy_kl(relations(t), relations(s)).mean(0)


TOKEN_CONFIG = {
    "hid": {"kind": "hidden", "weight": 0.5, "student": "v", "teacher": "v"},
    "rel": {
        "kind": "attention_relation",
        "weight": 2.0,
        "num_relation_heads": 2,
        "student": "q",
        "teacher": "k",
    },
}


def test_token_feature_terms_across_widths_average_over_valid_tokens():
    x = np.random.default_rng(4).normal(size=(3, 4, 5)).astype(np.float32)
    student, teacher = _qkv_features(4, 0, x), _qkv_features(6, 1, x)
    objective = Objective.from_config(TOKEN_CONFIG)
    assert objective.student_taps == ("v", "q") and objective.teacher_taps == ("v", "k")
    params = objective.init_params(jax.random.PRNGKey(2), student, teacher)
    assert params["hid"]["kernel"].shape == (4, 6) and "rel" not in params
    logits = np.zeros((3, 4, 7), np.float32)
    loss, metrics = jax.jit(
        lambda p, sf, tf: objective(
            p,
            student_logits=logits,
            teacher_logits=logits,
            labels=np.zeros((3, 4), int),
            where=TOKEN_MASK,
            student_features=sf,
            teacher_features=tf,
        )
    )(params, student, teacher)
    kernel, bias = np.asarray(params["hid"]["kernel"]), np.asarray(params["hid"]["bias"])
    hidden = ((student["v"] @ kernel + bias - teacher["v"]) ** 2).mean(-1)[TOKEN_MASK].mean()
    relation = np.concatenate(
        [
            _numpy_relation_kl(student["q"][b], teacher["k"][b], 2, np.flatnonzero(row))
            for b, row in enumerate(TOKEN_MASK)
            if row.any()
        ]
    ).mean()
    np.testing.assert_allclose(metrics["loss/hid"], hidden, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/rel"], relation, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * hidden + 2.0 * relation, rtol=1e-5)


def test_token_feature_terms_with_one_label_per_example_use_every_token_of_valid_examples():
    x = np.random.default_rng(5).normal(size=(3, 4, 5)).astype(np.float32)
    student, teacher = _qkv_features(4, 0, x), _qkv_features(4, 1, x)
    objective = Objective.from_config(
        {"rel": {"kind": "attention_relation", **TOKEN_CONFIG["rel"]}}
    )
    examples = np.array([True, False, True])
    _, metrics = objective(
        {},
        student_logits=np.zeros((3, 7), np.float32),
        teacher_logits=np.zeros((3, 7), np.float32),
        labels=np.zeros(3, int),
        where=examples,
        student_features=student,
        teacher_features=teacher,
    )
    every_token = np.arange(4)
    relation = np.concatenate(
        [_numpy_relation_kl(student["q"][b], teacher["k"][b], 2, every_token) for b in (0, 2)]
    ).mean()
    np.testing.assert_allclose(metrics["loss/rel"], relation, rtol=1e-5)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "options", "match"),
    [
        ((2, 4, 8), (2, 5, 8), {}, r"same batch and token axes"),
        ((2, 4, 8), (2, 4, 6), {"num_relation_heads": 4}, r"6 channels, not divisible by"),
        ((2, 8), (2, 8), {}, r"must have rank 3 \(batch, tokens, channels\)"),
    ],
)
def test_token_feature_shapes_are_checked_at_init_naming_taps(
    student_shape, teacher_shape, options, match
):
    objective = Objective.from_config(
        {"rel": {"kind": "attention_relation", "student": "s/q", "teacher": "t/q", **options}}
    )
    names = re.escape(
        f"loss term 'rel' (attention_relation) cannot match student feature 's/q' of shape "
        f"{student_shape} with teacher feature 't/q' of shape {teacher_shape}: "
    )
    with pytest.raises(ValueError, match=names + ".*" + match):
        objective.init_params(
            jax.random.PRNGKey(0),
            {"s/q": jax.ShapeDtypeStruct(student_shape, jnp.float32)},
            {"t/q": jax.ShapeDtypeStruct(teacher_shape, jnp.float32)},
        )


def test_hidden_term_needs_taps_and_takes_no_options():
    with pytest.raises(ValueError, match=r"feature loss term 'hidden' \(hidden\) needs 'student'"):
        Objective.from_config({"hidden": {"student": "v"}})
    with pytest.raises(
        ValueError, match=r"has no option 'p'; its options are \['weight', 'student', 'teacher'\]"
    ):
        Objective.from_config({"hidden": {"student": "v", "teacher": "v", "p": 2.0}})


def test_token_features_must_match_the_labels_shape():
    objective = Objective.from_config({"hidden": {"student": "v", "teacher": "v"}})
    feats = {"v": np.zeros((2, 3, 4), np.float32)}
    params = objective.init_params(jax.random.PRNGKey(0), feats, feats)
    with pytest.raises(
        ValueError, match=r"loss term 'hidden' \(hidden\): token features 'v' of shape \(2, 3, 4\)"
    ):
        objective(
            params,
            student_logits=np.zeros((2, 5, 6), np.float32),
            teacher_logits=np.zeros((2, 5, 6), np.float32),
            labels=np.zeros((2, 5), int),
            student_features=feats,
            teacher_features=feats,
        )
