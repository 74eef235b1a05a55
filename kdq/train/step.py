"""The jitted teacher/student train step and the eval step.

One `train_step(state, teacher_variables, batch)` runs, in one XLA program:
the teacher's forward pass (inference mode, no gradient), the student's
forward pass with weights and activations fake-quantized by the recipe (QAT),
the objective (cross-entropy + distillation terms) and the optimizer update
of the student params, the learned quantizer params and the loss params. A
step whose loss, gradient or updated state (params, quantizer state, loss
params, optimizer state, BatchNorm statistics) is not finite leaves the state
unchanged and reports `finite = 0`, so a caller can stop before anything
corrupt is saved.

Randomness: step t uses k_t = fold_in(state.key, t): dropout draws from k_t,
and stochastic-rounding quantizers from fold_in(k_t, QUANT_STREAM) (weights
and activations then fold in their own path, see
`kdq.quant.qat.apply_quantized`), so every step draws fresh rounding noise
and a resumed run draws the same noise again. Evaluation rounds to nearest.

Shapes are checked when the step is traced: images (B, ...), labels (B,) of
an integer dtype, logits (B, num_classes); a mismatch is a ValueError.
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
from kdq.quant.qat import pact_alpha_penalty, quantized_weights, quantizer_keys
from kdq.quant.recipe import QuantRecipe
from kdq.train.state import TrainState

Batch = dict[str, jax.Array]
FLOAT = QuantRecipe()
# fold_in(k_t, QUANT_STREAM) is the step's stochastic-rounding key.
QUANT_STREAM = 0x5155414E


def check_batch_shapes(images: Any, labels: Any, mask: Any = None) -> None:
    """ValueError unless labels are integers of shape (B,) for images (B, ...) (trace time)."""
    images, label_shape, label_dtype = jnp.shape(images), jnp.shape(labels), jnp.result_type(labels)
    if len(images) < 1:
        raise ValueError(f"batch['image'] must have a batch axis, got shape {images}")
    if label_shape != images[:1]:
        raise ValueError(
            f"batch['label'] must have shape (B,) = ({images[0]},) for images of shape "
            f"{images}, got shape {label_shape}: pass one integer class per example "
            "(e.g. labels.reshape(-1) for (B, 1) labels)"
        )
    if not jnp.issubdtype(label_dtype, jnp.integer):
        raise ValueError(f"batch['label'] must hold integer class indices, got dtype {label_dtype}")
    if mask is not None and jnp.shape(mask) != images[:1]:
        raise ValueError(
            f"batch['mask'] must have shape ({images[0]},), got shape {jnp.shape(mask)}"
        )


def check_logits_shape(logits: jax.Array, labels: jax.Array) -> None:
    """ValueError unless the model's logits are (B, num_classes) for labels (B,) (trace time)."""
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"the model must return logits of shape (B, num_classes) = ({labels.shape[0]}, C), "
            f"got shape {logits.shape}"
        )


def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every floating-point leaf of `tree` is finite.

    Args:
      tree: any pytree; integer and boolean leaves are ignored.

    Returns:
      A boolean scalar (True for a tree without floating-point leaves).
    """
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _quantized_forward(
    model,
    variables,
    quant_params,
    recipe,
    images,
    *,
    taps=(),
    train=False,
    rng=None,
    quant_key=None,
):
    """Student logits, tapped features and updated model state under `recipe`.

    In training (`train=True`) the non-param collections (BatchNorm statistics)
    are updated and returned; in evaluation they are used as they are.
    `quant_key` feeds stochastic-rounding quantizers.
    """
    weight_key, act_key = (None, None) if quant_key is None else quantizer_keys(quant_key)
    weights = quantized_weights(variables["params"], recipe, quant_params, key=weight_key)
    model_state = {name: value for name, value in variables.items() if name != "params"}
    intercept = (
        nn.intercept_methods(
            activation_interceptor(recipe, quant_params.get("activations"), key=act_key)
        )
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
        the forward pass (QAT); the default trains in float. With act_mode
        "pact" the loss includes PACT's penalty
        `recipe.pact_alpha_decay * sum alpha^2` (`kdq.quant.qat.pact_alpha_penalty`).

    Returns:
      `step(state, teacher_variables, batch) -> (state, metrics)`, jitted with
      the state donated. `batch` holds "image" (B, H, W, C) and "label" (B,)
      integers; `teacher_variables` is ignored (pass None) when the objective
      has no teacher term. Metrics: "loss" (the optimised total), "accuracy",
      "finite", "loss/<term>" and, with PACT, "loss/pact_alpha_decay".
    """
    if objective.needs_teacher and teacher is None:
        raise ValueError("the objective has distillation terms but no teacher model was given")

    pact_penalty = recipe.act_mode == "pact" and recipe.pact_alpha_decay > 0

    def train_step(state: TrainState, teacher_variables: Any, batch: Batch):
        images, labels = batch["image"], batch["label"]
        check_batch_shapes(images, labels)
        step_key = jax.random.fold_in(state.key, state.step)
        quant_key = jax.random.fold_in(step_key, QUANT_STREAM) if recipe.stochastic else None
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
                rng=step_key,
                quant_key=quant_key,
            )
            check_logits_shape(logits, labels)
            loss, metrics = objective(
                trainable["distill"],
                student_logits=logits,
                teacher_logits=teacher_logits,
                labels=labels,
                student_features=features,
                teacher_features=teacher_features,
            )
            if pact_penalty:
                penalty = pact_alpha_penalty(trainable["quant"], recipe)
                metrics = {**metrics, "loss/pact_alpha_decay": penalty}
                loss = loss + penalty
            return loss, (logits, metrics, model_state)

        (loss, (logits, metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable
        )
        candidate = state.apply_gradients(grads, tx).replace(model_state=model_state)
        finite = (
            jnp.isfinite(loss)
            & all_finite(grads)
            & all_finite((candidate.trainable, candidate.opt_state, candidate.model_state))
        )
        new_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), candidate, state
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
        evaluated with the quantized weights and activations it is trained
        with; stochastic rules round to nearest (`recipe.with_nearest_rounding()`),
        so evaluation is deterministic.

    Returns:
      `eval_step(variables, quant_params, batch) -> {"correct", "count",
      "loss_sum"}` summed over the examples with batch["mask"] true (all when
      there is no mask); `variables` = {"params": ..., other collections}.
    """

    recipe = recipe.with_nearest_rounding()

    def eval_step(variables: Any, quant_params: Any, batch: Batch):
        check_batch_shapes(batch["image"], batch["label"], batch.get("mask"))
        logits, _, _ = _quantized_forward(
            model, variables, quant_params or {}, recipe, batch["image"]
        )
        check_logits_shape(logits, batch["label"])
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
