r"""Divergences between teacher and student next-token distributions (LM distillation).

Every function compares, for each logit vector on the last axis, the teacher distribution
:math:`p = \mathrm{softmax}(t / T)` with the student distribution
:math:`q = \mathrm{softmax}(s / T)` and returns :math:`T^2 D(p, q)`. The :math:`T^2`
factor is the one of `kdq.distill.kd_loss` (it keeps the gradient scale of the KL terms
independent of :math:`T`); it is applied to every divergence here, total variation
included, so that a term's weight means the same at any temperature. The default
:math:`T = 1` is the plain divergence, as in GKD and DistiLLM.

The conventions are those of `kdq.distill.losses`: logits ``(..., V)`` with any leading
shape (``(B, T, V)``: one value per token), an optional boolean ``where`` mask of the
leading shape, an unreduced result of the leading shape that is 0 where masked (masked
logits never reach the result or the gradients, even when they hold NaN or inf),
computation in at least float32, gradients into both arguments, static hyperparameters
validated eagerly, and concrete logits checked to be finite on the valid entries.

All distributions stay in log space: :math:`\log p`, :math:`\log q` come from
``log_softmax`` and a mixture :math:`\log(w a + (1 - w) b)` is
``logaddexp(log w + log a, log(1 - w) + log b)``, which is exact (and has zero gradient
through the vanishing branch) at :math:`w \in \{0, 1\}`.
"""

import math

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from kdq.distill.losses import _check_positive, _masked_logits


def _check_unit_interval(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _log_probs(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: float,
    where: ArrayLike | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log q, log p, valid): student and teacher log-softmax of ``logits / T``, and the mask."""
    _check_positive("temperature", temperature)
    student, teacher, valid = _masked_logits(student_logits, teacher_logits, where)
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    return log_q, log_p, valid


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    r""":math:`\mathrm{KL}(a \| b) = \sum_v a_v (\log a_v - \log b_v)` over the last axis."""
    return optax.losses.kl_divergence_with_log_targets(log_b, log_a)


def _log_mixture(log_a: jax.Array, log_b: jax.Array, weight: float) -> jax.Array:
    r""":math:`\log(w a + (1 - w) b)` for a static weight :math:`w \in [0, 1]`."""
    log_weight = math.log(weight) if weight > 0 else -math.inf
    log_rest = math.log1p(-weight) if weight < 1 else -math.inf
    return jnp.logaddexp(log_weight + log_a, log_rest + log_b)


def _scaled(loss: jax.Array, valid: jax.Array, temperature: float) -> jax.Array:
    """``T^2 * loss`` on the valid entries, 0 elsewhere."""
    return jnp.where(valid, temperature**2 * loss, 0.0)


def forward_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Forward KL, mode-covering: :math:`T^2\,\mathrm{KL}(p \| q) = T^2 \sum_v p_v \log(p_v / q_v)`.

    Equal to `kdq.distill.kd_loss` at the same temperature (whose default is 4, not 1).

    Args:
        student_logits: Student logits, shape ``(..., V)``, e.g. ``(B, T, V)``.
        teacher_logits: Teacher logits, the student's shape.
        temperature: Softmax temperature :math:`T > 0`.
        where: Optional boolean mask of valid entries, the leading shape ``(...)``.

    Returns:
        Unreduced loss of the leading shape; 0 for masked-out entries.

    Raises:
        ValueError: For mismatched shapes, ``temperature <= 0``, or concrete logits holding
            NaN or inf in a valid entry.
    """
    log_q, log_p, valid = _log_probs(student_logits, teacher_logits, temperature, where)
    return _scaled(_kl(log_p, log_q), valid, temperature)


def reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Reverse KL, mode-seeking: :math:`T^2\,\mathrm{KL}(q \| p) = T^2 \sum_v q_v \log(q_v / p_v)`.

    Reference:
        Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024.

    Args:
        student_logits: Student logits, shape ``(..., V)``, e.g. ``(B, T, V)``.
        teacher_logits: Teacher logits, the student's shape.
        temperature: Softmax temperature :math:`T > 0`.
        where: Optional boolean mask of valid entries, the leading shape ``(...)``.

    Returns:
        Unreduced loss of the leading shape; 0 for masked-out entries.

    Raises:
        ValueError: For mismatched shapes, ``temperature <= 0``, or concrete logits holding
            NaN or inf in a valid entry.
    """
    log_q, log_p, valid = _log_probs(student_logits, teacher_logits, temperature, where)
    return _scaled(_kl(log_q, log_p), valid, temperature)


def generalized_jsd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al.), teacher :math:`p` first.

    .. math::

        m = \beta p + (1 - \beta) q, \qquad
        \mathrm{JSD}_\beta(p \| q) = \beta\,\mathrm{KL}(p \| m) + (1 - \beta)\,\mathrm{KL}(q \| m),

    times :math:`T^2`. :math:`\beta = 1/2` is the usual JSD, bounded by :math:`\ln 2`; in
    general :math:`0 \le \mathrm{JSD}_\beta \le H(\beta) = -\beta \ln \beta - (1 - \beta)
    \ln(1 - \beta)`. The definition is continuous in :math:`\beta` and vanishes at both ends
    (:math:`m = q` at :math:`\beta = 0`, :math:`m = p` at :math:`\beta = 1`); it is the
    *scaled* divergence that tends to the two KLs:

    .. math::

        \lim_{\beta \to 0} \mathrm{JSD}_\beta / \beta = \mathrm{KL}(p \| q) \ \text{(forward)},
        \qquad
        \lim_{\beta \to 1} \mathrm{JSD}_\beta / (1 - \beta) = \mathrm{KL}(q \| p)
        \ \text{(reverse)},

    since the other term is :math:`O(\beta^2)` (resp. :math:`O((1 - \beta)^2)`). So gradients
    behave like those of forward KL for small :math:`\beta` and like reverse KL for
    :math:`\beta` near 1, at a scale shrinking with :math:`\beta` (resp. :math:`1 - \beta`).
    Implementations that switch to the plain KLs at :math:`\beta \in \{0, 1\}` (TRL's
    ``generalized_jsd_loss``) differ from this definition at those two points only; use
    `forward_kl` / `reverse_kl` for them.

    Reference:
        Agarwal et al., "On-Policy Distillation of Language Models: Learning from
        Self-Generated Mistakes" (GKD), ICLR 2024.

    Args:
        student_logits: Student logits, shape ``(..., V)``, e.g. ``(B, T, V)``.
        teacher_logits: Teacher logits, the student's shape.
        beta: Teacher weight :math:`\beta \in [0, 1]` of the mixture.
        temperature: Softmax temperature :math:`T > 0`.
        where: Optional boolean mask of valid entries, the leading shape ``(...)``.

    Returns:
        Unreduced loss of the leading shape; 0 for masked-out entries.

    Raises:
        ValueError: For mismatched shapes, ``beta`` outside ``[0, 1]``, ``temperature <= 0``,
            or concrete logits holding NaN or inf in a valid entry.
    """
    _check_unit_interval("beta", beta)
    log_q, log_p, valid = _log_probs(student_logits, teacher_logits, temperature, where)
    log_m = _log_mixture(log_p, log_q, beta)
    loss = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return _scaled(loss, valid, temperature)


def skew_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Skew KL of DistiLLM: :math:`T^2\,\mathrm{KL}(p \| \alpha p + (1 - \alpha) q)`.

    :math:`\alpha = 0` is the forward KL, :math:`\alpha = 1` gives 0; the skew bounds the
    divergence by :math:`-\ln \alpha` and its gradients for :math:`\alpha > 0`. The paper's
    default is :math:`\alpha = 0.1`.

    Reference:
        Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models",
        ICML 2024.

    Args:
        student_logits: Student logits, shape ``(..., V)``, e.g. ``(B, T, V)``.
        teacher_logits: Teacher logits, the student's shape.
        alpha: Teacher weight :math:`\alpha \in [0, 1]` of the skewed student distribution.
        temperature: Softmax temperature :math:`T > 0`.
        where: Optional boolean mask of valid entries, the leading shape ``(...)``.

    Returns:
        Unreduced loss of the leading shape; 0 for masked-out entries.

    Raises:
        ValueError: For mismatched shapes, ``alpha`` outside ``[0, 1]``, ``temperature <= 0``,
            or concrete logits holding NaN or inf in a valid entry.
    """
    _check_unit_interval("alpha", alpha)
    log_q, log_p, valid = _log_probs(student_logits, teacher_logits, temperature, where)
    return _scaled(_kl(log_p, _log_mixture(log_p, log_q, alpha)), valid, temperature)


def skew_reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Skew reverse KL of DistiLLM: :math:`T^2\,\mathrm{KL}(q \| \alpha q + (1 - \alpha) p)`.

    :math:`\alpha = 0` is the reverse KL, :math:`\alpha = 1` gives 0.

    Reference:
        Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models",
        ICML 2024.

    Args:
        student_logits: Student logits, shape ``(..., V)``, e.g. ``(B, T, V)``.
        teacher_logits: Teacher logits, the student's shape.
        alpha: Student weight :math:`\alpha \in [0, 1]` of the skewed teacher distribution.
        temperature: Softmax temperature :math:`T > 0`.
        where: Optional boolean mask of valid entries, the leading shape ``(...)``.

    Returns:
        Unreduced loss of the leading shape; 0 for masked-out entries.

    Raises:
        ValueError: For mismatched shapes, ``alpha`` outside ``[0, 1]``, ``temperature <= 0``,
            or concrete logits holding NaN or inf in a valid entry.
    """
    _check_unit_interval("alpha", alpha)
    log_q, log_p, valid = _log_probs(student_logits, teacher_logits, temperature, where)
    return _scaled(_kl(log_q, _log_mixture(log_q, log_p, alpha)), valid, temperature)


def total_variation(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Total variation distance :math:`T^2 \cdot \tfrac12 \sum_v |p_v - q_v|`, in :math:`[0, T^2]`.

    Reference:
        Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation",
        ACL 2023.

    Args:
        student_logits: Student logits, shape ``(..., V)``, e.g. ``(B, T, V)``.
        teacher_logits: Teacher logits, the student's shape.
        temperature: Softmax temperature :math:`T > 0`.
        where: Optional boolean mask of valid entries, the leading shape ``(...)``.

    Returns:
        Unreduced loss of the leading shape; 0 for masked-out entries.

    Raises:
        ValueError: For mismatched shapes, ``temperature <= 0``, or concrete logits holding
            NaN or inf in a valid entry.
    """
    log_q, log_p, valid = _log_probs(student_logits, teacher_logits, temperature, where)
    loss = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)
    return _scaled(loss, valid, temperature)
