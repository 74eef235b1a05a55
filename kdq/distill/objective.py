"""The combined training objective: hard-label cross-entropy + distillation terms.

    L = sum_i w_i * mean_{valid b} loss_i(b)

where b runs over the entries of the labels' shape: examples for (B,) labels,
tokens for (B, T) labels; a feature term (one loss per example) runs over the
examples that hold a valid entry, and a token feature term (one loss per token
of (B, T, D) features) over the valid tokens.

Each term is named in a mapping (e.g. an ml_collections config):

    {
      "ce": {"weight": 0.1},
      "kd": {"weight": 0.9, "temperature": 4.0},
      "hint": {"kind": "fitnets", "weight": 1.0, "student": "Dense_0", "teacher": "Conv_1"},
    }

The term's kind is its `kind` field, or its name when that is a known kind.
Logit terms ("kd", "dkd", and the LM divergences "forward_kl", "reverse_kl",
"jsd", "skew_kl", "skew_reverse_kl", "total_variation") compare the two models'
outputs; feature terms ("fitnets", "attention", "rkd", "pkt", "sp") and token
feature terms ("hidden", "attention_relation") compare the outputs of the
submodules tapped by the `student` and `teacher` path regexes. Every other
field is passed to the loss function as a keyword argument: it must be one of
that function's keyword parameters, and a numeric option must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kdq.distill import divergences, losses, relations


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


def _without_labels(loss_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`loss_fn(student_logits, teacher_logits, **options)` called as a logit loss.

    Logit losses are called with the labels as third argument; the returned function
    drops them. It keeps `loss_fn`'s signature (functools.wraps), from which the term's
    options are read.
    """

    @functools.wraps(loss_fn)
    def logit_loss(student_logits, teacher_logits, labels, **options):
        del labels
        return loss_fn(student_logits, teacher_logits, **options)

    return logit_loss


LOGIT_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "ce": _cross_entropy,
    "kd": _without_labels(losses.kd_loss),
    "dkd": losses.dkd_loss,
    "forward_kl": _without_labels(divergences.forward_kl),
    "reverse_kl": _without_labels(divergences.reverse_kl),
    "jsd": _without_labels(divergences.generalized_jsd),
    "skew_kl": _without_labels(divergences.skew_kl),
    "skew_reverse_kl": _without_labels(divergences.skew_reverse_kl),
    "total_variation": _without_labels(divergences.total_variation),
}
FEATURE_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "fitnets": losses.fitnets_loss,
    "attention": losses.attention_transfer_loss,
    "rkd": losses.rkd_loss,
    "pkt": losses.pkt_loss,
    "sp": losses.similarity_preserving_loss,
}
# Losses of (B, T, D) token features: (B, T) loss under a (B, T) token mask.
TOKEN_FEATURE_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "hidden": relations.hidden_state_loss,
    "attention_relation": relations.attention_relation_loss,
}
# Kinds whose loss learns a FitNets projection from student to teacher channels.
_PROJECTED_KINDS = ("fitnets", "hidden")


def _loss_function(kind: str) -> Callable[..., jax.Array]:
    """The function whose keyword parameters a term of `kind` may set."""
    return LOGIT_LOSSES.get(kind) or FEATURE_LOSSES.get(kind) or TOKEN_FEATURE_LOSSES[kind]


def _is_tapped(kind: str) -> bool:
    """Whether a term of `kind` compares tapped features (and so needs taps)."""
    return kind in FEATURE_LOSSES or kind in TOKEN_FEATURE_LOSSES


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
    """The registered term kinds (a loss added to any registry is one).

    Returns:
      The names in `LOGIT_LOSSES`, `FEATURE_LOSSES` and `TOKEN_FEATURE_LOSSES`.
    """
    return (*LOGIT_LOSSES, *FEATURE_LOSSES, *TOKEN_FEATURE_LOSSES)


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted loss term.

    Attributes:
      name: the term's key in the objective mapping (used in metrics).
      kind: one of `loss_kinds()`.
      weight: its weight w_i.
      options: keyword arguments for the loss function.
      student_tap, teacher_tap: feature tap regexes (feature and token feature terms only).
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
                f"{['weight', *(['student', 'teacher'] if _is_tapped(kind) else []), *accepted]}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"loss term {name!r} ({kind}) option {option}={value!r} must be finite"
            )
    if _is_tapped(kind) and not (student_tap and teacher_tap):
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

        A token feature term is evaluated abstractly (`jax.eval_shape`) on its features,
        so that every shape and option check of its loss (e.g. equal token counts, widths
        divisible by `num_relation_heads`) fails here rather than in the first step.

        Args:
          key: PRNG key.
          student_features, teacher_features: {tap: array or ShapeDtypeStruct}.

        Returns:
          {term name: params} for the terms that learn something.

        Raises:
          ValueError: a term's student and teacher features cannot be compared.
        """
        params = {}
        for i, term in enumerate(self.terms):
            if not _is_tapped(term.kind):
                continue
            s_feat = student_features[term.student_tap]
            t_feat = teacher_features[term.teacher_tap]
            if term.kind in FEATURE_LOSSES:
                _check_example_feature_shapes(term, tuple(s_feat.shape), tuple(t_feat.shape))
            if term.kind in _PROJECTED_KINDS:
                params[term.name] = losses.init_projection(
                    jax.random.fold_in(key, i), s_feat.shape[-1], t_feat.shape[-1]
                )
            if term.kind in TOKEN_FEATURE_LOSSES:
                _check_token_term(term, params, s_feat, t_feat)
        return params

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
        any valid entry: where.reshape(B, -1).any(-1). A token feature term
        ((B, T) loss of (B, T, D) features) is averaged over the valid tokens:
        with (B, T) labels those of `where`, with (B,) labels every token of a
        valid example (padding is then not masked).

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
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        for term in self.terms:
            try:
                if term.kind in LOGIT_LOSSES:
                    loss = LOGIT_LOSSES[term.kind](
                        student_logits, teacher_logits, labels, where=valid, **dict(term.options)
                    )
                    mask = valid
                else:
                    mask = _feature_mask(term, valid, student_features[term.student_tap].shape)
                    loss = _tapped_loss(term, params, student_features, teacher_features, mask)
            except ValueError as e:
                raise ValueError(f"loss term {term.name!r} ({term.kind}): {e}") from e
            value = loss.sum() / jnp.maximum(mask.sum(), 1).astype(jnp.float32)
            metrics[f"loss/{term.name}"] = value
            total = total + term.weight * value
        return total, metrics


def _check_example_feature_shapes(term: Term, s_shape: tuple, t_shape: tuple) -> None:
    """Raises unless a feature term's (per-example) student and teacher shapes can be compared."""
    same_axes = term.kind in ("fitnets", "attention")
    mismatch = s_shape[0] != t_shape[0]
    if same_axes:
        mismatch |= s_shape[1:-1] != t_shape[1:-1]
    if mismatch:
        raise ValueError(
            f"loss term {term.name!r} ({term.kind}) cannot match student feature "
            f"{term.student_tap!r} of shape {s_shape} with teacher feature "
            f"{term.teacher_tap!r} of shape {t_shape}"
            + (
                ": all axes but the last (channels) must agree"
                if same_axes
                else ": batch sizes differ"
            )
        )


def _check_token_term(term: Term, params: Mapping[str, Any], s_feat: Any, t_feat: Any) -> None:
    """Evaluates a token feature term abstractly, naming its taps if its loss rejects them."""
    try:
        jax.eval_shape(
            lambda p, s, t: _tapped_loss(term, p, {term.student_tap: s}, {term.teacher_tap: t}),
            params,
            jax.ShapeDtypeStruct(s_feat.shape, s_feat.dtype),
            jax.ShapeDtypeStruct(t_feat.shape, t_feat.dtype),
        )
    except ValueError as e:
        raise ValueError(
            f"loss term {term.name!r} ({term.kind}) cannot match student feature "
            f"{term.student_tap!r} of shape {tuple(s_feat.shape)} with teacher feature "
            f"{term.teacher_tap!r} of shape {tuple(t_feat.shape)}: {e}"
        ) from e


def _feature_mask(term: Term, valid: jax.Array, feature_shape: tuple) -> jax.Array:
    """The mask a tapped term's loss takes, from the mask `valid` of the labels' shape.

    A feature term gets the (B,) mask of the examples with any valid entry. A token
    feature term with (B, T, ...) features gets `valid` itself for (B, T) labels, and
    `valid` repeated over the T tokens for (B,) labels.
    """
    if term.kind in FEATURE_LOSSES:
        return jnp.any(valid.reshape(valid.shape[0], -1), axis=1)
    tokens = tuple(feature_shape[:2])
    if valid.shape == tokens:
        return valid
    if valid.ndim == 1 and len(tokens) == 2 and valid.shape[0] == tokens[0]:
        return jnp.broadcast_to(valid[:, None], tokens)
    raise ValueError(
        f"token features {term.student_tap!r} of shape {tuple(feature_shape)} need labels of "
        f"their (batch, tokens) shape {tokens} or one label per example, got labels of shape "
        f"{tuple(valid.shape)}"
    )


def _tapped_loss(term, params, student_features, teacher_features, mask=None) -> jax.Array:
    """The unreduced loss of a feature or token feature term under `mask`."""
    loss_fn = FEATURE_LOSSES.get(term.kind) or TOKEN_FEATURE_LOSSES[term.kind]
    features = [student_features[term.student_tap], teacher_features[term.teacher_tap]]
    if term.kind in _PROJECTED_KINDS:
        features.append(params[term.name])
    return loss_fn(*features, where=mask, **dict(term.options))


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
