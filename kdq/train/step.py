"""The jitted teacher/student train step and the eval step: where each technique enters.

One `train_step(state, teacher_variables, batch)` is one XLA program:

1. **Task.** `task.inputs(batch)` is what both models see; `task.targets(batch)`
   (labels and the mask of valid targets) is what the objective and the
   metrics compare with. Nothing else in the step reads the batch.
2. **Teacher** (distillation only): its forward pass in inference mode, its
   tapped features, both behind `stop_gradient`; it is never differentiated.
3. **Quantization** (QAT): the student runs under `kdq.quant.apply_quantized`,
   its weights fake-quantized by `recipe.weight_rules` and the inputs of its
   Dense / Conv / Einsum modules by `recipe.act_rules`, with the learned
   quantizer state `state.quant_params`; the quantizers' training penalties
   (`kdq.quant.quantizer_penalties`, e.g. PACT's alpha decay) join the loss.
4. **Objective**: cross-entropy and distillation terms
   (`kdq.distill.Objective`), with the loss terms' own parameters
   (FitNets projections) in `state.distill_params`.
5. **Optimizer**: one gradient of the loss with respect to
   `state.trainable` = {"params", "quant", "distill"}, one `tx` update.
   **Pruning** is the last transform of `tx` (`kdq.prune.Pruning.transform`):
   it masks the updated params, so pruned weights stay exactly zero.
6. **Guard**: a step whose loss, gradient or updated state (params,
   quantizer state, loss params, optimizer state, BatchNorm statistics) is
   not finite leaves the state unchanged and reports `finite = 0`.

Randomness: step t uses k_t = fold_in(state.key, t): dropout draws from k_t,
and stochastic-rounding quantizers from fold_in(k_t, QUANT_STREAM) (weights
and activations then fold in their own path, see
`kdq.quant.apply_quantized`), so every step draws fresh rounding noise and a
resumed run draws the same noise again. Evaluation rounds to nearest.

Shapes are checked when the step is traced (`Task.check_batch`,
`Task.check_logits`); a mismatch is a ValueError.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kdq.distill.objective import Objective
from kdq.distill.taps import apply_with_taps
from kdq.quant import FLOAT, QuantRecipe, apply_quantized, quantizer_penalties
from kdq.tasks import Classification, Task
from kdq.train.state import TrainState

Batch = dict[str, jax.Array]
# fold_in(k_t, QUANT_STREAM) is the step's stochastic-rounding key.
QUANT_STREAM = 0x5155414E


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


def _jit(fn: Callable, max_traces: int | None, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fn)` that raises an AssertionError when traced more than `max_traces` times.

    The count belongs to this jitted object, so every run counts its own
    traces (`chex.assert_max_traces` counts per definition site instead: the
    runs of one process, e.g. a demo of 24 runs, would share one count).
    """
    if max_traces is None:
        return jax.jit(fn, **jit_kwargs)
    traces = 0

    @functools.wraps(fn)
    def counted(*args):
        nonlocal traces
        traces += 1
        if traces > max_traces:
            raise AssertionError(
                f"{fn.__name__} was traced {traces} times (at most {max_traces} allowed): its "
                "arguments changed shape, dtype or sharding between calls, so XLA would "
                "compile it again"
            )
        return fn(*args)

    return jax.jit(counted, **jit_kwargs)


def _teacher_outputs(teacher, objective: Objective, teacher_variables: Any, inputs: Any):
    """The teacher's logits and tapped features (inference mode, no gradient); (None, {}) without."""
    if not objective.needs_teacher:
        return None, {}
    logits, features, _ = apply_with_taps(
        teacher, teacher_variables, inputs, taps=objective.teacher_taps, train=False
    )
    return jax.lax.stop_gradient((logits, features))


def _keep_if_finite(state: TrainState, candidate: TrainState, loss, grads):
    """(candidate if the loss, the gradient and the candidate are finite else state, finite)."""
    finite = (
        jnp.isfinite(loss)
        & all_finite(grads)
        & all_finite((candidate.trainable, candidate.opt_state, candidate.model_state))
    )
    kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), candidate, state)
    return kept, finite


def make_train_step(
    student: nn.Module,
    objective: Objective,
    tx: optax.GradientTransformation,
    *,
    task: Task | None = None,
    teacher: nn.Module | None = None,
    recipe: QuantRecipe = FLOAT,
    max_traces: int | None = None,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted train step (see the module docstring for what it computes).

    Args:
      student: the Linen model being trained.
      objective: the weighted loss terms.
      tx: the optax optimizer over `TrainState.trainable` (pruning last).
      task: what a batch holds (default `kdq.tasks.Classification()`).
      teacher: the Linen teacher, required when the objective distills.
      recipe: how the student's weights and activations are quantized in
        the forward pass (QAT); the default trains in float.
      max_traces: if set, tracing the step more often raises an
        AssertionError: the run loop passes 1, so a run that would
        recompile its step fails instead.

    Returns:
      `step(state, teacher_variables, batch) -> (state, metrics)`, jitted with
      the state donated; `teacher_variables` is ignored (pass None) when the
      objective has no teacher term. Metrics: "loss" (the optimised total),
      the task's metrics (classification: "accuracy"), "finite",
      "loss/<term>" and "loss/<penalty>" of the quantizers.
    """
    task = task or Classification()
    if objective.needs_teacher and teacher is None:
        raise ValueError("the objective has distillation terms but no teacher model was given")
    student_apply = functools.partial(apply_with_taps, taps=objective.student_taps)

    def train_step(state: TrainState, teacher_variables: Any, batch: Batch):
        task.check_batch(batch)
        inputs, targets = task.inputs(batch), task.targets(batch)
        step_key = jax.random.fold_in(state.key, state.step)
        quant_key = jax.random.fold_in(step_key, QUANT_STREAM) if recipe.stochastic else None
        teacher_logits, teacher_features = _teacher_outputs(
            teacher, objective, teacher_variables, inputs
        )

        def loss_fn(trainable):
            logits, features, updates = apply_quantized(
                student,
                {"params": trainable["params"], **state.model_state},
                inputs,
                recipe=recipe,
                quant_params=trainable["quant"],
                key=quant_key,
                apply_fn=student_apply,
                train=True,
                mutable=list(state.model_state),
                rngs={"dropout": step_key},
            )
            task.check_logits(logits, targets)
            loss, metrics = objective(
                trainable["distill"],
                student_logits=logits,
                teacher_logits=teacher_logits,
                labels=targets.labels,
                where=targets.where,
                student_features=features,
                teacher_features=teacher_features,
            )
            for name, penalty in quantizer_penalties(trainable["quant"], recipe).items():
                metrics = {**metrics, f"loss/{name}": penalty}
                loss = loss + penalty
            return loss, (logits, metrics, {**state.model_state, **updates})

        (loss, (logits, metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable
        )
        candidate = state.apply_gradients(grads, tx).replace(model_state=model_state)
        new_state, finite = _keep_if_finite(state, candidate, loss, grads)
        metrics = {
            **metrics,
            "loss": loss,
            **task.metrics(logits, targets),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    return _jit(train_step, max_traces, donate_argnums=0)


def make_eval_step(
    model: nn.Module,
    *,
    task: Task | None = None,
    recipe: QuantRecipe = FLOAT,
    max_traces: int | None = None,
) -> Callable[[Any, Any, Batch], dict[str, jax.Array]]:
    """Builds the jitted eval step.

    Args:
      model: the Linen model.
      task: what a batch holds (default `kdq.tasks.Classification()`).
      recipe: the same recipe as in training, so that a QAT model is
        evaluated with the quantized weights and activations it is trained
        with; stochastic rules round to nearest (`recipe.with_nearest_rounding()`),
        so evaluation is deterministic.
      max_traces: as for `make_train_step`.

    Returns:
      `eval_step(variables, quant_params, batch) -> task.eval_sums(...)`
      (classification: {"correct", "count", "loss_sum"}) summed over the
      valid targets (batch["mask"]); `variables` = {"params": ..., other
      collections}.
    """
    task = task or Classification()
    recipe = recipe.with_nearest_rounding()

    def eval_step(variables: Any, quant_params: Any, batch: Batch):
        task.check_batch(batch)
        targets = task.targets(batch)
        logits = apply_quantized(
            model,
            variables,
            task.inputs(batch),
            recipe=recipe,
            quant_params=quant_params,
            train=False,
        )
        task.check_logits(logits, targets)
        return task.eval_sums(logits, targets)

    return _jit(eval_step, max_traces)
