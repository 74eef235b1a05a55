"""The jitted teacher/student train step and the eval step.

One `train_step(state, teacher_variables, batch)` runs, in one XLA program:
the teacher's forward pass (inference mode, no gradient), the student's
forward pass with weights and activations fake-quantized by the recipe (QAT),
the objective (cross-entropy + distillation terms) and the optimizer update
of the student params, the learned quantizer params and the loss params. A
step whose loss or gradient is not finite leaves the state unchanged and
reports `finite = 0`, so a caller can stop before anything corrupt is saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kdq.distill.objective import Objective
from kdq.distill.taps import apply_with_taps
from kdq.quant.intercept import activation_interceptor
from kdq.quant.qat import quantized_weights
from kdq.quant.recipe import QuantRecipe
from kdq.train.state import TrainState

Batch = dict[str, jax.Array]
FLOAT = QuantRecipe()


def _quantized_forward(
    model, variables, quant_params, recipe, images, *, taps=(), train=False, rng=None
):
    """Student logits, tapped features and updated model state under `recipe`.

    In training (`train=True`) the non-param collections (BatchNorm statistics)
    are updated and returned; in evaluation they are used as they are.
    """
    weights = quantized_weights(variables["params"], recipe, quant_params)
    model_state = {name: value for name, value in variables.items() if name != "params"}
    intercept = (
        nn.intercept_methods(activation_interceptor(recipe, quant_params.get("activations")))
        if recipe.quantizes_activations
        else contextlib.nullcontext()
    )
    with intercept:
        logits, features, updates = apply_with_taps(
            model,
            {"params": weights, **model_state},
            images,
            taps=taps,
            train=train,
            mutable=list(model_state) if train else False,
            rngs=None if rng is None else {"dropout": rng},
        )
    return logits, features, {**model_state, **updates}


def make_train_step(
    student: nn.Module,
    objective: Objective,
    tx: optax.GradientTransformation,
    *,
    teacher: nn.Module | None = None,
    recipe: QuantRecipe = FLOAT,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted train step.

    Args:
      student: the Linen model being trained.
      objective: the weighted loss terms.
      tx: the optax optimizer over `TrainState.trainable`.
      teacher: the Linen teacher, required when the objective distills.
      recipe: how the student's weights and activations are quantized in
        the forward pass (QAT); the default trains in float.

    Returns:
      `step(state, teacher_variables, batch) -> (state, metrics)`, jitted with
      the state donated. `batch` holds "image" (B, H, W, C) and "label" (B,);
      `teacher_variables` is ignored (pass None) when the objective has no
      teacher term. Metrics: "loss", "accuracy", "finite" and "loss/<term>".
    """
    if objective.needs_teacher and teacher is None:
        raise ValueError("the objective has distillation terms but no teacher model was given")

    def train_step(state: TrainState, teacher_variables: Any, batch: Batch):
        images, labels = batch["image"], batch["label"]
        teacher_logits, teacher_features = None, {}
        if objective.needs_teacher:
            teacher_logits, teacher_features, _ = apply_with_taps(
                teacher, teacher_variables, images, taps=objective.teacher_taps, train=False
            )
            teacher_logits, teacher_features = jax.lax.stop_gradient(
                (teacher_logits, teacher_features)
            )

        def loss_fn(trainable):
            logits, features, model_state = _quantized_forward(
                student,
                {"params": trainable["params"], **state.model_state},
                trainable["quant"],
                recipe,
                images,
                taps=objective.student_taps,
                train=True,
                rng=jax.random.fold_in(state.key, state.step),
            )
            loss, metrics = objective(
                trainable["distill"],
                student_logits=logits,
                teacher_logits=teacher_logits,
                labels=labels,
                student_features=features,
                teacher_features=teacher_features,
            )
            return loss, (logits, metrics, model_state)

        (loss, (logits, metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable
        )
        # One reduction: the global norm is finite iff every gradient entry is.
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        new_state = jax.lax.cond(
            finite,
            lambda: state.apply_gradients(grads, tx).replace(model_state=model_state),
            lambda: state,
        )
        metrics = {
            **metrics,
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(
    model: nn.Module, *, recipe: QuantRecipe = FLOAT
) -> Callable[[Any, Any, Batch], dict[str, jax.Array]]:
    """Builds the jitted eval step.

    Args:
      model: the Linen model.
      recipe: the same recipe as in training, so that a QAT model is
        evaluated with the quantized weights and activations it is trained with.

    Returns:
      `eval_step(variables, quant_params, batch) -> {"correct", "count",
      "loss_sum"}` summed over the examples with batch["mask"] true (all when
      there is no mask); `variables` = {"params": ..., other collections}.
    """

    def eval_step(variables: Any, quant_params: Any, batch: Batch):
        logits, _, _ = _quantized_forward(
            model, variables, quant_params or {}, recipe, batch["image"]
        )
        return classification_sums(logits, batch)

    return jax.jit(eval_step)


def classification_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Correct predictions, example count and summed cross-entropy over the masked batch."""
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, bool))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
        "count": jnp.sum(mask),
        "loss_sum": jnp.sum(jnp.where(mask, loss, 0.0)),
    }
