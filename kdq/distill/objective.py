"""The combined training objective: hard-label cross-entropy + distillation terms.

    L = sum_i w_i * mean_{valid b} loss_i(b)

where b runs over the entries of the labels' shape: examples for (B,) labels,
tokens for (B, T) labels; a feature term (one loss per example) runs over the
examples that hold a valid entry.

Each term is named in a mapping (e.g. an ml_collections config):

    {
      "ce": {"weight": 0.1},
      "kd": {"weight": 0.9, "temperature": 4.0},
      "hint": {"kind": "fitnets", "weight": 1.0, "student": "Dense_0", "teacher": "Conv_1"},
    }

The term's kind is its `kind` field, or its name when that is a known kind.
Logit terms ("kd", "dkd") compare the two models' outputs; feature terms
("fitnets", "attention", "rkd", "pkt", "sp") compare the outputs of the
submodules tapped by the `student` and `teacher` path regexes. Every other
field is passed to the loss function as a keyword argument: it must be one of
that function's keyword parameters, and a numeric option must be finite.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kdq.distill import losses


def _cross_entropy(student_logits, teacher_logits, labels, *, where=None, label_smoothing=0.0):
    """Unreduced hard-label cross-entropy of the leading shape of the logits (..., C).

    With smoothed one-hot targets q = (1 - e) onehot(y) + e / C (e = label_smoothing),
    loss = -sum_c q_c log softmax(z)_c per logit vector; 0 where `where` is False.
    """
    del teacher_logits
    num_classes = student_logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    loss = optax.softmax_cross_entropy(student_logits, targets)
    return loss if where is None else jnp.where(where, loss, 0.0)


def _kd(student_logits, teacher_logits, labels, **kwargs):
    del labels
    return losses.kd_loss(student_logits, teacher_logits, **kwargs)


LOGIT_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "ce": _cross_entropy,
    "kd": _kd,
    "dkd": losses.dkd_loss,
}
FEATURE_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "fitnets": losses.fitnets_loss,
    "attention": losses.attention_transfer_loss,
    "rkd": losses.rkd_loss,
    "pkt": losses.pkt_loss,
    "sp": losses.similarity_preserving_loss,
}


def _loss_function(kind: str) -> Callable[..., jax.Array]:
    """The function whose keyword parameters a term of `kind` may set."""
    if kind == "kd":
        return losses.kd_loss
    return LOGIT_LOSSES.get(kind) or FEATURE_LOSSES[kind]


def _option_names(kind: str) -> tuple[str, ...] | None:
    """The options a term of `kind` accepts (None: any, the function takes **kwargs)."""
    parameters = inspect.signature(_loss_function(kind)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return tuple(
        p.name
        for p in parameters
        if p.default is not inspect.Parameter.empty and p.name not in ("where", "params")
    )


def loss_kinds() -> tuple[str, ...]:
    """The registered term kinds (a loss added to either registry is one).

    Returns:
      The names in `LOGIT_LOSSES` and `FEATURE_LOSSES`.
    """
    return (*LOGIT_LOSSES, *FEATURE_LOSSES)


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted loss term.

    Attributes:
      name: the term's key in the objective mapping (used in metrics).
      kind: one of `loss_kinds()`.
      weight: its weight w_i.
      options: keyword arguments for the loss function.
      student_tap, teacher_tap: feature tap regexes (feature terms only).
    """

    name: str
    kind: str
    weight: float
    options: tuple[tuple[str, Any], ...] = ()
    student_tap: str | None = None
    teacher_tap: str | None = None


def _parse_term(name: str, fields: Mapping[str, Any]) -> Term:
    fields = dict(fields)
    kind = fields.pop("kind", name)
    if kind not in loss_kinds():
        raise ValueError(
            f"loss term {name!r} has unknown kind={kind!r}; known kinds: {list(loss_kinds())} "
            "(set 'kind' when the term's name is not a kind)"
        )
    weight = fields.pop("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(f"loss term {name!r} needs a finite weight >= 0, got weight={weight!r}")
    student_tap = fields.pop("student", None)
    teacher_tap = fields.pop("teacher", None)
    accepted = _option_names(kind)
    for option, value in fields.items():
        if accepted is not None and option not in accepted:
            raise ValueError(
                f"loss term {name!r} ({kind}) has no option {option!r}; its options are "
                f"{['weight', *(['student', 'teacher'] if kind in FEATURE_LOSSES else []), *accepted]}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"loss term {name!r} ({kind}) option {option}={value!r} must be finite"
            )
    if kind in FEATURE_LOSSES and not (student_tap and teacher_tap):
        raise ValueError(
            f"feature loss term {name!r} ({kind}) needs 'student' and 'teacher' module path "
            f"regexes, got student={student_tap!r}, teacher={teacher_tap!r}"
        )
    if kind in LOGIT_LOSSES and (student_tap or teacher_tap):
        raise ValueError(f"logit loss term {name!r} ({kind}) takes no 'student'/'teacher' taps")
    return Term(
        name=name,
        kind=kind,
        weight=float(weight),
        options=tuple(sorted(fields.items())),
        student_tap=student_tap,
        teacher_tap=teacher_tap,
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """A weighted sum of loss terms; hashable, so it can be closed over by `jit`."""

    terms: tuple[Term, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Mapping[str, Any]]) -> Objective:
        """Builds the objective from {term name: {"weight": w, ...}}."""
        if not config:
            raise ValueError("the objective needs at least one loss term, got none")
        terms = tuple(_parse_term(name, fields) for name, fields in config.items())
        return cls(terms=tuple(t for t in terms if t.weight > 0))

    @property
    def needs_teacher(self) -> bool:
        return any(t.kind != "ce" for t in self.terms)

    @property
    def student_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.student_tap for t in self.terms if t.student_tap))

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.teacher_tap for t in self.terms if t.teacher_tap))

    def init_params(
        self,
        key: jax.Array,
        student_features: Mapping[str, Any],
        teacher_features: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Learned parameters of the terms (FitNets projections), checking feature shapes.

        Args:
          key: PRNG key.
          student_features, teacher_features: {tap: array or ShapeDtypeStruct}.

        Returns:
          {term name: params} for the terms that learn something.
        """
        params = {}
        for i, term in enumerate(self.terms):
            if term.kind not in FEATURE_LOSSES:
                continue
            s_shape = tuple(student_features[term.student_tap].shape)
            t_shape = tuple(teacher_features[term.teacher_tap].shape)
            mismatch = s_shape[0] != t_shape[0]
            if term.kind in ("fitnets", "attention"):
                mismatch |= s_shape[1:-1] != t_shape[1:-1]
            if mismatch:
                raise ValueError(
                    f"loss term {term.name!r} ({term.kind}) cannot match student feature "
                    f"{term.student_tap!r} of shape {s_shape} with teacher feature "
                    f"{term.teacher_tap!r} of shape {t_shape}"
                    + (
                        ": all axes but the last (channels) must agree"
                        if term.kind in ("fitnets", "attention")
                        else ": batch sizes differ"
                    )
                )
            if term.kind == "fitnets":
                params[term.name] = losses.init_projection(
                    jax.random.fold_in(key, i), s_shape[-1], t_shape[-1]
                )
        return params

    @staticmethod
    def _feature_loss(term, params, student_features, teacher_features, valid):
        """The per-example loss (B,) of a feature term; `valid` is the (B,) example mask."""
        kwargs = dict(term.options)
        s_feat = student_features[term.student_tap]
        t_feat = teacher_features[term.teacher_tap]
        if term.kind == "fitnets":
            return losses.fitnets_loss(s_feat, t_feat, params[term.name], where=valid, **kwargs)
        return FEATURE_LOSSES[term.kind](s_feat, t_feat, where=valid, **kwargs)

    def __call__(
        self,
        params: Mapping[str, Any],
        *,
        student_logits: jax.Array,
        teacher_logits: jax.Array | None,
        labels: jax.Array,
        student_features: Mapping[str, jax.Array] | None = None,
        teacher_features: Mapping[str, jax.Array] | None = None,
        where: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Evaluates L on one batch.

        Logits have a leading shape L, e.g. (B,) with one label per example or
        (B, T) with one label per token. A logit term's value is its mean over
        the valid entries, sum_{where} loss / max(#where, 1); a feature term
        (one loss per example) is averaged over the valid examples, those with
        any valid entry: where.reshape(B, -1).any(-1).

        Args:
          params: the terms' learned parameters (from `init_params`).
          student_logits: (*L, C).
          teacher_logits: (*L, C), or None when no term needs the teacher.
          labels: integer labels, shape L.
          student_features, teacher_features: {tap: feature} from the taps.
          where: optional boolean mask of valid entries, shape L.

        Returns:
          (L, metrics) where metrics holds each term's unweighted batch mean.
        """
        valid = _check_batch(student_logits, teacher_logits, labels, where)
        examples = jnp.any(valid.reshape(valid.shape[0], -1), axis=1)
        count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
        example_count = jnp.maximum(examples.sum(), 1).astype(jnp.float32)
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        for term in self.terms:
            try:
                if term.kind in LOGIT_LOSSES:
                    loss = LOGIT_LOSSES[term.kind](
                        student_logits, teacher_logits, labels, where=valid, **dict(term.options)
                    )
                    value = loss.sum() / count
                else:
                    loss = self._feature_loss(
                        term, params, student_features, teacher_features, examples
                    )
                    value = loss.sum() / example_count
            except ValueError as e:
                raise ValueError(f"loss term {term.name!r} ({term.kind}): {e}") from e
            metrics[f"loss/{term.name}"] = value
            total = total + term.weight * value
        return total, metrics


def _check_batch(student_logits, teacher_logits, labels, where) -> jax.Array:
    """Checks the shapes of one batch and returns the mask of valid entries (labels' shape)."""
    if student_logits.ndim < 2 or tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match student logits of shape "
            f"{tuple(student_logits.shape)}: pass one integer label per logit vector, shape "
            f"{tuple(student_logits.shape[:-1])}, with logits of rank >= 2 (batch, ..., classes)"
        )
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits of shape {tuple(teacher_logits.shape)} do not match student "
            f"logits of shape {tuple(student_logits.shape)}"
        )
    if where is None:
        return jnp.ones(labels.shape, bool)
    where = jnp.asarray(where)
    if tuple(where.shape) != tuple(labels.shape) or where.dtype != jnp.bool_:
        raise ValueError(
            f"where must be a boolean mask of the labels' shape {tuple(labels.shape)}, got "
            f"dtype {where.dtype} and shape {tuple(where.shape)}"
        )
    return where
