"""Tasks: the one part of training that knows what a batch holds.

The train step composes a task, a student (and optionally a teacher), an
objective and a quantization / pruning recipe. The task alone reads the
batch:

    x = task.inputs(batch)                  # what the model is called on
    targets = task.targets(batch)           # labels + where (valid entries)
    logits = model.apply(variables, x)
    loss, _ = objective(..., labels=targets.labels, where=targets.where)
    task.metrics(logits, targets)           # batch means, logged in training
    task.eval_sums(logits, targets)         # sums over valid entries, added up
    task.summarize(totals)                  # over a split, then normalised

so a task with per-token targets (labels of shape (B, T)) plugs into the
same step as one with a label per example. `TASKS` maps `config.task` to
the task: "classification" (images), "text_classification" (token
sequences, one class each) and "language_modeling" (next-token prediction).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import struct

Batch = Mapping[str, jax.Array]


@struct.dataclass
class Targets:
    """What the objective and the metrics compare the model's output with.

    Attributes:
      labels: integer targets, one per prediction: (B,) per example, (B, T)
        per token.
      where: bool, the shape of `labels`: which targets count (padding
        examples of an evaluation batch, padding tokens, are False).
    """

    labels: jax.Array
    where: jax.Array


class Task(Protocol):
    """What a batch holds and how predictions are scored (see the module docstring)."""

    name: str

    def num_outputs(self, dataset: Any) -> int:
        """The size of the model's last axis for `dataset` (classes, vocabulary)."""

    def inputs(self, batch: Batch) -> Any:
        """What the model is called on."""

    def targets(self, batch: Batch) -> Targets:
        """The labels and their validity mask."""

    def check_batch(self, batch: Batch) -> None:
        """ValueError naming the batch entry whose shape or dtype is wrong (trace time)."""

    def check_logits(self, logits: jax.Array, targets: Targets) -> None:
        """ValueError unless the model's output fits the targets (trace time)."""

    def metrics(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        """Batch-mean metrics logged during training."""

    def eval_sums(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        """Sums over the valid targets, added up over the batches of a split."""

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """The split's metrics from the summed `eval_sums`."""


def _shape(batch: Batch, key: str) -> tuple[int, ...]:
    if key not in batch:
        raise ValueError(f"the batch has no {key!r} entry; its entries are {sorted(batch)}")
    return jnp.shape(batch[key])


@struct.dataclass
class Classification:
    """One integer class per example: batch[input_key] (B, ...) -> logits (B, num_classes).

    Metrics: top-1 accuracy and the mean cross-entropy
    -1/N sum_b log softmax(z_b)[y_b] over the N valid examples (batch["mask"],
    all when absent).

    Attributes:
      name: the task's name in `TASKS`.
      input_key: the batch entry the model is called on: "image" (images,
        (B, H, W, C)) or "tokens" (token sequences, (B, T)).
    """

    name: str = struct.field(pytree_node=False, default="classification")
    input_key: str = struct.field(pytree_node=False, default="image")

    def num_outputs(self, dataset: Any) -> int:
        if not dataset.num_classes:
            raise ValueError(
                f"classification needs the dataset's number of classes; dataset "
                f"{dataset.name!r} has num_classes={dataset.num_classes!r}"
            )
        return dataset.num_classes

    def inputs(self, batch: Batch) -> jax.Array:
        return batch[self.input_key]

    def targets(self, batch: Batch) -> Targets:
        labels = batch["label"]
        where = batch.get("mask")
        return Targets(labels, jnp.ones(labels.shape, bool) if where is None else where)

    def check_batch(self, batch: Batch) -> None:
        key = self.input_key
        images, label_shape = _shape(batch, key), _shape(batch, "label")
        if len(images) < 1:
            raise ValueError(f"batch[{key!r}] must have a batch axis, got shape {images}")
        if label_shape != images[:1]:
            raise ValueError(
                f"batch['label'] must have shape (B,) = ({images[0]},) for inputs of shape "
                f"{images}, got shape {label_shape}: pass one integer class per example "
                "(e.g. labels.reshape(-1) for (B, 1) labels)"
            )
        label_dtype = jnp.result_type(batch["label"])
        if not jnp.issubdtype(label_dtype, jnp.integer):
            raise ValueError(
                f"batch['label'] must hold integer class indices, got dtype {label_dtype}"
            )
        if "mask" in batch and jnp.shape(batch["mask"]) != images[:1]:
            raise ValueError(
                f"batch['mask'] must have shape ({images[0]},), got shape "
                f"{jnp.shape(batch['mask'])}"
            )

    def check_logits(self, logits: jax.Array, targets: Targets) -> None:
        batch = targets.labels.shape[0]
        if logits.ndim != 2 or logits.shape[0] != batch:
            raise ValueError(
                f"the model must return logits of shape (B, num_classes) = ({batch}, C), "
                f"got shape {logits.shape}"
            )

    def metrics(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == targets.labels)}

    def eval_sums(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        labels, where = targets.labels, targets.where
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & where),
            "count": jnp.sum(where),
            "loss_sum": jnp.sum(jnp.where(where, loss, 0.0)),
        }

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        count = max(int(sums["count"]), 1)
        return {"accuracy": float(sums["correct"]) / count, "loss": float(sums["loss_sum"]) / count}


@struct.dataclass
class LanguageModeling:
    """Next-token prediction over byte sequences: logits (B, T, V) for the targets tokens[:, 1:].

    A batch holds "tokens" (B, T + 1) int32 and "token_mask" (B, T) bool
    (which targets are real text, `kdq.data.TokenFeatures`), and in
    evaluation "mask" (B,) for padding examples. The model reads
    x = tokens[:, :-1] and predicts y = tokens[:, 1:]; a target counts where
    token_mask (and mask) hold.

    Metrics over the N valid targets: next-token accuracy, the cross-entropy
    in nats per token, L = -1/N sum log softmax(z_t)[y_t], and in bits per
    byte, L / ln 2 (each token is one byte, `kdq.data.text`).
    """

    name: str = struct.field(pytree_node=False, default="language_modeling")

    def num_outputs(self, dataset: Any) -> int:
        if not dataset.num_classes:
            raise ValueError(
                f"language modelling needs the dataset's vocabulary size; dataset "
                f"{dataset.name!r} has num_classes={dataset.num_classes!r}"
            )
        return dataset.num_classes

    def inputs(self, batch: Batch) -> jax.Array:
        return batch["tokens"][:, :-1]

    def targets(self, batch: Batch) -> Targets:
        where = batch["token_mask"]
        if "mask" in batch:
            where = where & batch["mask"][:, None]
        return Targets(batch["tokens"][:, 1:], where)

    def check_batch(self, batch: Batch) -> None:
        tokens, token_mask = _shape(batch, "tokens"), _shape(batch, "token_mask")
        if len(tokens) != 2 or tokens[1] < 2:
            raise ValueError(
                f"batch['tokens'] must have shape (B, T + 1) with T >= 1, got shape {tokens}"
            )
        if not jnp.issubdtype(jnp.result_type(batch["tokens"]), jnp.integer):
            raise ValueError(
                f"batch['tokens'] must hold integer token ids, got dtype "
                f"{jnp.result_type(batch['tokens'])}"
            )
        expected = (tokens[0], tokens[1] - 1)
        if token_mask != expected or jnp.result_type(batch["token_mask"]) != jnp.bool_:
            raise ValueError(
                f"batch['token_mask'] must be a bool array of shape (B, T) = {expected} for "
                f"tokens of shape {tokens}, got {jnp.result_type(batch['token_mask'])} of shape "
                f"{token_mask}"
            )
        if "mask" in batch and jnp.shape(batch["mask"]) != tokens[:1]:
            raise ValueError(
                f"batch['mask'] must have shape ({tokens[0]},), got shape "
                f"{jnp.shape(batch['mask'])}"
            )

    def check_logits(self, logits: jax.Array, targets: Targets) -> None:
        batch, length = targets.labels.shape
        if logits.ndim != 3 or logits.shape[:2] != (batch, length):
            raise ValueError(
                f"the model must return logits of shape (B, T, vocab) = ({batch}, {length}, V), "
                f"got shape {logits.shape}"
            )

    def metrics(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        labels, where = targets.labels, targets.where
        count = jnp.maximum(jnp.sum(where), 1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels) & where
        return {
            "accuracy": jnp.sum(correct) / count,
            "bits_per_byte": jnp.sum(jnp.where(where, loss, 0.0)) / count / math.log(2),
        }

    def eval_sums(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        return Classification().eval_sums(logits, targets)

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        count = max(int(sums["count"]), 1)
        nats = float(sums["loss_sum"]) / count
        return {
            "accuracy": float(sums["correct"]) / count,
            "loss": nats,
            "bits_per_byte": nats / math.log(2),
        }


TASKS: dict[str, Any] = {
    "classification": Classification,
    "text_classification": functools.partial(
        Classification, name="text_classification", input_key="tokens"
    ),
    "language_modeling": LanguageModeling,
}


def get_task(name: str) -> Task:
    """The task registered as `name` in `TASKS`.

    Args:
      name: a key of `TASKS` ("classification", "text_classification",
        "language_modeling").

    Returns:
      A new instance of the task.

    Raises:
      ValueError: no task has that name; lists the registered ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name]()
