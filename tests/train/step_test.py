import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdq.distill.objective import Objective
from kdq.models import create_model
from kdq.quant import QuantSpec
from kdq.quant.recipe import QuantRecipe
from kdq.train import TrainState, make_eval_step, make_train_step

IMAGE_SHAPE = (8, 8, 1)


def _batch(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(size=(size, *IMAGE_SHAPE)).astype(np.float32),
        "label": rng.integers(0, 10, size=size).astype(np.int32),
    }


def _setup(objective_config, weight_rules=(), lr=1e-2):
    student = create_model("mlp", num_classes=10, hidden=(16,))
    teacher = create_model("cnn", num_classes=10, channels=(4, 8), dense=16)
    dummy = jnp.zeros((1, *IMAGE_SHAPE))
    params = student.init(jax.random.PRNGKey(0), dummy)["params"]
    teacher_variables = teacher.init(jax.random.PRNGKey(1), dummy)
    objective = Objective.from_config(objective_config)
    tx = optax.sgd(lr)
    state = TrainState.create(params=params, tx=tx, key=jax.random.PRNGKey(2))
    step = make_train_step(
        student, objective, tx, teacher=teacher, recipe=QuantRecipe(weight_rules=weight_rules)
    )
    return student, teacher, teacher_variables, state, step


KD = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}}


def test_teacher_gets_no_gradient_and_no_update():
    _, _, teacher_variables, state, step = _setup(KD)
    before = jax.tree_util.tree_map(np.array, teacher_variables)

    def loss_of_teacher(variables):
        state_copy = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its state
        return step(state_copy, variables, _batch())[1]["loss"]

    grads = jax.grad(loss_of_teacher)(teacher_variables)
    for leaf in jax.tree_util.tree_leaves(grads):
        np.testing.assert_array_equal(leaf, 0.0)
    step(state, teacher_variables, _batch())
    jax.tree_util.tree_map(np.testing.assert_array_equal, teacher_variables, before)


def test_step_compiles_once_for_many_steps():
    _, _, teacher_variables, state, step = _setup(KD)
    for i in range(5):
        state, _ = step(state, teacher_variables, _batch(seed=i))
    assert step._cache_size() == 1
    assert int(state.step) == 5


def _numpy_fake_quant_per_channel(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=0, keepdims=True) / qmax
    return np.clip(np.round(w / scale), -qmax - 1, qmax) * scale


def test_qat_student_computes_with_4bit_per_channel_weights():
    spec = QuantSpec(bits=4, axes=(-1,))
    student, _, _, state, step = _setup({"ce": {"weight": 1.0}}, weight_rules=[(".*kernel", spec)])
    batch = _batch()
    quantized = jax.tree_util.tree_map(np.asarray, state.params)
    for layer in quantized.values():
        layer["kernel"] = _numpy_fake_quant_per_channel(layer["kernel"], 4).astype(np.float32)
    logits = student.apply({"params": quantized}, batch["image"])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    _, metrics = step(state, None, batch)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_eval_step_counts_only_masked_in_examples():
    student = create_model("mlp", num_classes=10, hidden=(16,))
    params = student.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))["params"]
    batch = _batch(size=8)
    batch["mask"] = np.array([True] * 5 + [False] * 3)
    out = make_eval_step(student)({"params": params}, {}, batch)
    predictions = np.argmax(student.apply({"params": params}, batch["image"]), -1)
    assert int(out["count"]) == 5
    assert int(out["correct"]) == int(np.sum(predictions[:5] == batch["label"][:5]))


def test_non_finite_loss_leaves_the_state_unchanged():
    _, _, teacher_variables, state, step = _setup(KD)
    batch = _batch()
    batch["image"][0, 0, 0, 0] = np.nan
    before = jax.tree_util.tree_map(np.array, state)
    new_state, metrics = step(state, teacher_variables, batch)
    assert float(metrics["finite"]) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_state, before)


def test_feature_distillation_trains_the_projection():
    config = {
        "ce": {"weight": 1.0},
        "fitnets": {"weight": 1.0, "student": "Dense_0", "teacher": "Dense_0"},
    }
    student, teacher, teacher_variables, state, _ = _setup(config)
    objective = Objective.from_config(config)
    projection = objective.init_params(
        jax.random.PRNGKey(3),
        {"Dense_0": jax.ShapeDtypeStruct((16, 16), jnp.float32)},
        {"Dense_0": jax.ShapeDtypeStruct((16, 16), jnp.float32)},
    )
    tx = optax.sgd(1e-2)
    state = TrainState.create(
        params=state.params, tx=tx, key=jax.random.PRNGKey(2), distill_params=projection
    )
    step = make_train_step(student, objective, tx, teacher=teacher)
    new_state, metrics = step(state, teacher_variables, _batch())
    assert float(metrics["loss/fitnets"]) > 0
    assert not np.array_equal(
        new_state.distill_params["fitnets"]["kernel"], projection["fitnets"]["kernel"]
    )


def test_distillation_without_a_teacher_model_is_an_error():
    with pytest.raises(ValueError, match="no teacher model"):
        make_train_step(nn.Dense(3), Objective.from_config(KD), optax.sgd(0.1))


class ConvBN(nn.Module):
    """A conv + BatchNorm classifier: BN statistics are a separate collection."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x).mean(axis=(1, 2)))


def test_batchnorm_statistics_update_for_the_student_only():
    student, teacher = ConvBN(), ConvBN()
    images = _batch()["image"]
    student_vars = student.init(jax.random.PRNGKey(0), images)
    teacher_vars = teacher.init(jax.random.PRNGKey(1), images)
    teacher_vars = {
        "params": teacher_vars["params"],
        "batch_stats": jax.tree_util.tree_map(lambda x: x + 0.5, teacher_vars["batch_stats"]),
    }
    objective = Objective.from_config(KD)
    tx = optax.sgd(1e-2)
    state = TrainState.create(
        params=student_vars["params"],
        tx=tx,
        key=jax.random.PRNGKey(2),
        model_state={"batch_stats": student_vars["batch_stats"]},
    )
    step = make_train_step(student, objective, tx, teacher=teacher)
    teacher_before = jax.tree_util.tree_map(np.array, teacher_vars)
    # Student (computed before the step donates its state): the running mean
    # moves toward the batch mean of its conv output, momentum 0.9.
    conv = np.asarray(
        jax.lax.conv_general_dilated(
            images,
            student_vars["params"]["Conv_0"]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    )
    new_state, metrics = step(state, teacher_vars, _batch())
    expected_mean = 0.9 * 0.0 + 0.1 * conv.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(
        new_state.model_state["batch_stats"]["BatchNorm_0"]["mean"],
        expected_mean,
        rtol=1e-4,
        atol=1e-6,
    )
    # Teacher: inference mode (its running statistics are used, never updated).
    jax.tree_util.tree_map(np.testing.assert_array_equal, teacher_vars, teacher_before)
    teacher_logits = teacher.apply(teacher_vars, images, train=False)
    assert np.isfinite(float(metrics["loss"]))
    assert not np.allclose(
        teacher_logits, teacher.apply(teacher_vars, images, train=True, mutable=["batch_stats"])[0]
    )
