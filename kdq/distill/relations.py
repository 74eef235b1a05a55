r"""Token-level feature distillation for sequence models: hidden states and self-relations.

Both losses compare features of shape ``(B, T, D)`` (one vector per token, e.g. a block's
output or the q, k or v projection of an attention layer) of a student and a teacher whose
widths may differ (``Ds`` and ``Dt``); depths are matched by which layers are tapped. They
take a boolean token mask ``where`` of shape ``(B, T)`` and return an unreduced loss of
shape ``(B, T)``, 0 on masked tokens; masked tokens never reach the result or the
gradients, even when they hold NaN or inf. The other conventions (float32 at least,
eager checks of static shapes and options, finite concrete inputs on valid tokens,
gradients into the teacher too) are those of `kdq.distill.losses`.
"""

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from kdq.distill.losses import (
    _as_float,
    _check_finite_if_concrete,
    _valid_mask,
    _zero_masked_rows,
    project,
)


def _check_token_features(
    student_feat: ArrayLike, teacher_feat: ArrayLike, where: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(student, teacher, valid): float ``(B, T, D)`` features with masked tokens zeroed."""
    student, teacher = _as_float(student_feat, teacher_feat)
    for name, feat in (("student_feat", student), ("teacher_feat", teacher)):
        if feat.ndim != 3:
            raise ValueError(
                f"{name} must have rank 3 (batch, tokens, channels), got shape {feat.shape}"
            )
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            "student_feat and teacher_feat must have the same batch and token axes, got "
            f"student_feat shape {student.shape} and teacher_feat shape {teacher.shape}"
        )
    valid = _valid_mask(where, student.shape[:2])
    _check_finite_if_concrete("student_feat", student_feat, where, lead=2)
    _check_finite_if_concrete("teacher_feat", teacher_feat, where, lead=2)
    return _zero_masked_rows(student, valid), _zero_masked_rows(teacher, valid), valid


def hidden_state_loss(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    projection: Mapping[str, ArrayLike],
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Per-token mean squared error between projected student and teacher hidden states.

    .. math::

        \ell_{b,t} = \frac{1}{D_t} \sum_{d=1}^{D_t} \big(r(s_{b,t})_d - h_{b,t,d}\big)^2,
        \qquad r(s) = s W + c,

    with the learned FitNets projection :math:`r` (`kdq.distill.init_projection`,
    `kdq.distill.project`) from the student width :math:`D_s` to the teacher width
    :math:`D_t`, as the hidden-state loss of TinyBERT.

    Reference:
        Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding",
        Findings of EMNLP 2020.

    Args:
        student_feat: Student hidden states, shape ``(B, T, Ds)``.
        teacher_feat: Teacher hidden states, shape ``(B, T, Dt)``.
        projection: ``{"kernel": (Ds, Dt), "bias": (Dt,)}``.
        where: Optional boolean mask of valid tokens, shape ``(B, T)``.

    Returns:
        Per-token loss, shape ``(B, T)``; 0 for masked-out tokens.

    Raises:
        ValueError: For features that are not ``(B, T, D)`` with a common ``(B, T)``, a
            projection that does not map ``Ds`` to ``Dt``, a bad mask, or concrete features
            holding NaN or inf in a valid token.
    """
    student, teacher, valid = _check_token_features(student_feat, teacher_feat, where)
    projected = project(projection, student)
    if projected.shape != teacher.shape:
        raise ValueError(
            f"projection maps student_feat of shape {student.shape} to shape "
            f"{projected.shape}, which does not match teacher_feat of shape {teacher.shape}"
        )
    loss = jnp.mean(optax.losses.squared_error(projected, teacher), axis=-1)
    return jnp.where(valid, loss, 0.0)


def _relation_log_probs(feat: jax.Array, num_heads: int, keys: jax.Array) -> jax.Array:
    r"""``log softmax(A_h A_h^T / sqrt(d_r))`` over valid keys, shape ``(B, H, T, T)``.

    ``feat`` of shape ``(B, T, D)`` splits into ``num_heads`` contiguous blocks
    :math:`A_h` of :math:`d_r = D / H` channels; entries at masked keys are set to 0.
    """
    batch, tokens, channels = feat.shape
    head_dim = channels // num_heads
    heads = feat.reshape(batch, tokens, num_heads, head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", heads, heads) / math.sqrt(head_dim)
    key_mask = keys[:, None, None, :]
    # Masked keys are -inf in the log-softmax; replacing them keeps gradients finite.
    return jnp.where(key_mask, jax.nn.log_softmax(scores, axis=-1, where=key_mask), 0.0)


def _check_relation_heads(num_relation_heads: int, student: jax.Array, teacher: jax.Array) -> None:
    if (
        isinstance(num_relation_heads, bool)
        or not isinstance(num_relation_heads, int)
        or num_relation_heads < 1
    ):
        raise ValueError(f"num_relation_heads must be a positive int, got {num_relation_heads!r}")
    for name, feat in (("student_feat", student), ("teacher_feat", teacher)):
        if feat.shape[-1] % num_relation_heads:
            raise ValueError(
                f"{name} has {feat.shape[-1]} channels, not divisible by "
                f"num_relation_heads={num_relation_heads}; choose a common divisor of both widths"
            )


def attention_relation_loss(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    *,
    num_relation_heads: int = 4,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Self-attention relation distillation of MiniLMv2, per query token.

    The features :math:`A` (``(T, D)`` per example) split into :math:`H` relation heads
    :math:`A_h` of :math:`d_r = D / H` contiguous channels (student and teacher each with
    their own :math:`d_r`), and each head's relation is the scaled dot-product softmax over
    the valid key tokens :math:`\mathcal V`:

    .. math::

        R_{h,i,j} = \frac{\exp(\langle A_{h,i}, A_{h,j} \rangle / \sqrt{d_r})}
                         {\sum_{k \in \mathcal V} \exp(\langle A_{h,i}, A_{h,k} \rangle / \sqrt{d_r})},
        \qquad j \in \mathcal V, \\
        \ell_i = \frac{1}{H} \sum_{h=1}^{H} \mathrm{KL}\big(R^t_{h,i,:} \,\|\, R^s_{h,i,:}\big).

    Relation maps are ``T x T`` whatever the widths, so the student may be narrower than
    the teacher. MiniLMv2 sums this loss over the query-query, key-key and value-value
    relations of one layer: one term per projection, tapped e.g. at ``block_3/attn/q``.
    The mean of :math:`\ell` over valid tokens is the paper's per-relation loss.

    Reference:
        Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation for
        Compressing Pretrained Transformers", Findings of ACL 2021.

    Args:
        student_feat: Student features, shape ``(B, T, Ds)``.
        teacher_feat: Teacher features, shape ``(B, T, Dt)``.
        num_relation_heads: Number :math:`H \ge 1` of relation heads; it must divide both
            ``Ds`` and ``Dt``.
        where: Optional boolean mask of valid tokens, shape ``(B, T)``; masked tokens are
            neither queries (loss 0) nor keys of the others.

    Returns:
        Per-token loss, shape ``(B, T)``; 0 for masked-out tokens.

    Raises:
        ValueError: For features that are not ``(B, T, D)`` with a common ``(B, T)``,
            ``num_relation_heads`` not a positive int dividing both widths, a bad mask, or
            concrete features holding NaN or inf in a valid token.
    """
    student, teacher, valid = _check_token_features(student_feat, teacher_feat, where)
    _check_relation_heads(num_relation_heads, student, teacher)
    log_r_student = _relation_log_probs(student, num_relation_heads, valid)
    log_r_teacher = _relation_log_probs(teacher, num_relation_heads, valid)
    kl = optax.losses.kl_divergence_with_log_targets(log_r_student, log_r_teacher)
    return jnp.where(valid, jnp.mean(kl, axis=1), 0.0)
