import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.distill import losses
from kdq.distill.objective import Objective


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
