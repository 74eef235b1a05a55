"""Knowledge-distillation losses as pure functions returning unreduced losses.

Every loss follows the optax convention: it returns an *unreduced* loss and the caller
chooses the reduction, typically a mean over the valid entries. The logit losses (KD, DKD)
take logits of shape ``(..., C)`` with any leading shape, e.g. ``(B, C)`` (one value per
example) or ``(B, T, C)`` (one value per token), and return a loss of the leading shape;
the feature losses return one value per example, shape ``(B,)``.

Conventions shared by all losses:

* ``where`` is an optional boolean mask of the loss's shape: the leading shape of the
  logits for the logit losses, ``(B,)`` for the feature losses. Masked-out entries get
  loss 0, their inputs never influence the result or the gradients (even when they hold
  NaN or inf padding), and for the relational losses (RKD, PKT, similarity-preserving)
  masked-out examples are also removed as partners of the other examples, so the values
  on the valid examples equal the loss of the valid sub-batch alone.
* Losses are computed in at least float32: bfloat16/float16 inputs are promoted, float64
  inputs (with x64 enabled) stay float64.
* Gradients flow into the teacher arguments too; wrap them in ``jax.lax.stop_gradient``
  when the teacher must stay fixed.
* Hyperparameters (temperatures, weights, ``p``, ``eps``) are static Python numbers; they
  are validated eagerly, together with the static shapes, and a bad value raises
  ``ValueError`` naming the argument.
* Concrete inputs (NumPy arrays, or JAX arrays outside any trace, including arrays closed
  over by a jitted function) must be finite on the valid entries: NaN or inf there raises
  ``ValueError`` naming the argument, before anything is computed. Traced inputs (inside
  ``jax.jit``, ``jax.grad``, ``jax.vmap``) are not checked, since that would need a device
  round trip in every step: there a NaN or inf propagates into the loss of its entry
  (and into the other examples' losses for the relational losses).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

# Floor of the L2 norm when normalising vectors, as in ``torch.nn.functional.normalize``,
# which the reference implementations of AT, RKD and SP use.
_NORM_EPS = 1e-12
# Added to the per-example standard deviation of the logits in logit standardisation.
_STANDARDIZE_EPS = 1e-7
# Lower clamp of squared pairwise distances in RKD (official ``pdist``).
_RKD_SQUARED_DIST_EPS = 1e-12
# Gram and similarity matrices are tiny (B, B) products: compute them at full precision.
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _as_float(*arrays: ArrayLike) -> list[jax.Array]:
    """Casts ``arrays`` to their common floating dtype, at least float32."""
    arrays = [jnp.asarray(a) for a in arrays]
    dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
    return [a.astype(dtype) for a in arrays]


def _check_same_batch(
    student_name: str, student: jax.Array, teacher_name: str, teacher: jax.Array
) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{student_name} and {teacher_name} must have the same batch size, got shapes "
            f"{student.shape} and {teacher.shape}"
        )


def _check_min_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    if x.ndim < rank:
        raise ValueError(f"{name} must have rank >= {rank} {layout}, got shape {x.shape}")


def _valid_mask(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array:
    """Returns the boolean mask of valid entries, of the loss's `shape`."""
    if where is None:
        return jnp.ones(shape, dtype=bool)
    where = jnp.asarray(where)
    if where.shape != shape or where.dtype != jnp.bool_:
        raise ValueError(
            f"where must be a boolean array of shape {shape}, got dtype {where.dtype} and "
            f"shape {where.shape}"
        )
    return where


def _check_finite_if_concrete(
    name: str, x: ArrayLike, where: ArrayLike | None, *, lead: int = 1
) -> None:
    """Raises if a concrete ``x`` holds NaN or inf in an entry that ``where`` keeps.

    An entry is an index into the first ``lead`` axes of ``x`` (the axes of ``where``):
    one example for ``lead=1``, one token of ``(B, T, C)`` logits for ``lead=2``. ``x``
    and ``where`` have been validated already. Nothing is checked when either is a
    tracer: the check runs on the host and would otherwise cost a device round trip.
    """
    if isinstance(x, jax.core.Tracer) or isinstance(where, jax.core.Tracer):
        return
    x = np.asarray(x)
    shape = x.shape[:lead]
    finite = np.isfinite(x).reshape(shape + (-1,)).all(axis=-1)
    if where is not None:
        finite |= ~np.asarray(where)
    if finite.all():
        return
    if lead == 1:
        bad = np.flatnonzero(~finite)
        where_bad = f"{bad.size} example(s) of {shape[0]} (batch indices {bad[:8].tolist()}"
    else:
        bad = np.argwhere(~finite)
        where_bad = (
            f"{len(bad)} of the {finite.size} entries of leading shape {shape} "
            f"(indices {bad[:8].tolist()}"
        )
    raise ValueError(
        f"{name} holds NaN or inf in {where_bad}{'...' if len(bad) > 8 else ''}): the loss "
        "would be NaN; find where they come from, or exclude those entries with where"
    )


def _zero_masked_rows(x: jax.Array, valid: jax.Array) -> jax.Array:
    """``x`` with the entries that ``valid`` (of ``x``'s leading shape) masks set to 0."""
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - valid.ndim)), x, 0)


def _num_valid(valid: jax.Array, dtype: DTypeLike) -> jax.Array:
    """Number of valid examples, floored at 1 so that dividing by it is always safe."""
    return jnp.maximum(jnp.sum(valid), 1).astype(dtype)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """``x / max(||x||_2, 1e-12)`` along the last axis (``torch.nn.functional.normalize``)."""
    squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(squared_norm, _NORM_EPS**2))


def _check_logits(student_logits: ArrayLike, teacher_logits: ArrayLike) -> list[jax.Array]:
    """Validates the shapes of a logit loss and casts both to their float dtype."""
    student, teacher = _as_float(student_logits, teacher_logits)
    if student.ndim < 2:
        raise ValueError(
            f"student_logits must have rank >= 2 (batch, ..., classes), got shape {student.shape}"
        )
    if teacher.shape != student.shape:
        raise ValueError(
            "teacher_logits must have the same shape as student_logits, got "
            f"teacher_logits shape {teacher.shape} and student_logits shape {student.shape}"
        )
    return [student, teacher]


def _masked_logits(
    student_logits: ArrayLike, teacher_logits: ArrayLike, where: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(student, teacher, valid): float logits with masked entries zeroed, and the mask.

    The mask has the leading shape of the logits; concrete logits must be finite on it.
    """
    student, teacher = _check_logits(student_logits, teacher_logits)
    valid = _valid_mask(where, student.shape[:-1])
    lead = student.ndim - 1
    _check_finite_if_concrete("student_logits", student_logits, where, lead=lead)
    _check_finite_if_concrete("teacher_logits", teacher_logits, where, lead=lead)
    return _zero_masked_rows(student, valid), _zero_masked_rows(teacher, valid), valid


def _check_embeddings(
    student_name: str, student: ArrayLike, teacher_name: str, teacher: ArrayLike
) -> list[jax.Array]:
    """Validates the inputs of a relational loss and flattens them to ``(B, D)``."""
    student, teacher = _as_float(student, teacher)
    _check_min_rank(student_name, student, 2, "(batch, ...)")
    _check_min_rank(teacher_name, teacher, 2, "(batch, ...)")
    _check_same_batch(student_name, student, teacher_name, teacher)
    if student.shape[0] < 2:
        raise ValueError(
            f"{student_name} must hold a batch of at least 2 examples for a relational "
            f"loss, got shape {student.shape}"
        )
    batch = student.shape[0]
    return [student.reshape(batch, -1), teacher.reshape(batch, -1)]


def _standardize_logits(logits: jax.Array) -> jax.Array:
    """``(z - mean) / (1e-7 + std)`` over classes, with the unbiased (``ddof=1``) std."""
    centered = logits - jnp.mean(logits, axis=-1, keepdims=True)
    variance = jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / (logits.shape[-1] - 1)
    # The square root has an infinite derivative at 0 (constant logits): take it only where
    # the variance is positive, so that gradients stay finite.
    positive = variance > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
    return centered / (_STANDARDIZE_EPS + std)


def kd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 4.0,
    standardize: bool = False,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Vanilla knowledge-distillation loss on softened class probabilities.

    .. math::

        \ell = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)
             = T^2 \sum_c p^t_c (\log p^t_c - \log p^s_c).

    The :math:`T^2` factor keeps the gradient magnitude independent of the temperature:
    :math:`\partial \ell / \partial s = T\,(\mathrm{softmax}(s/T) - \mathrm{softmax}(t/T))`.
    It is computed for every logit vector on the last axis: one value per entry of the
    leading shape (an example, or a token of a sequence).

    With ``standardize=True`` both logit vectors are first replaced by their z-scores
    (logit standardisation), exactly as the official code does (``normalize`` in
    sunshangquan/logit-standardization-KD, ``(logit - mean) / (1e-7 + logit.std())``):

    .. math::

        z \mapsto \frac{z - \bar z}{10^{-7} + \sigma(z)}, \qquad
        \bar z = \frac{1}{C} \sum_c z_c, \qquad
        \sigma(z) = \sqrt{\frac{1}{C - 1} \sum_c (z_c - \bar z)^2},

    i.e. with PyTorch's default unbiased (``ddof=1``) standard deviation over the :math:`C`
    classes, which needs :math:`C \ge 2`. ``temperature`` then plays the role of the base
    temperature of the paper, so its hyperparameters carry over unchanged; dividing by the
    population standard deviation (``ddof=0``) instead would scale the z-scores by
    :math:`\sqrt{C/(C-1)}`, i.e. act as a softmax temperature :math:`\sqrt{(C-1)/C}` times
    the given one. Constant logits standardise to zeros (a uniform distribution). The
    :math:`T^2` factor is kept, as in the official code.

    References:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
        Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024.

    Args:
        student_logits: Student logits, shape ``(..., C)``: ``(B, C)`` per example, ``(B, T, C)`` per token.
        teacher_logits: Teacher logits, shape ``(..., C)``, as the student's.
        temperature: Softmax temperature :math:`T > 0`.
        standardize: Z-score both logit vectors of each example before the softmax.
        where: Optional boolean mask of valid entries, the leading shape ``(...)``.

    Returns:
        Unreduced loss of the leading shape ``(...)``; 0 for masked-out entries.

    Raises:
        ValueError: For mismatched shapes, ``temperature <= 0``, ``standardize=True`` with
            fewer than 2 classes, or concrete logits holding NaN or inf in a valid example.
    """
    student, teacher = _check_logits(student_logits, teacher_logits)
    _check_positive("temperature", temperature)
    if standardize and student.shape[-1] < 2:
        raise ValueError(
            "student_logits must have at least 2 classes for standardize=True (the unbiased "
            f"standard deviation of one class is undefined), got shape {student.shape}"
        )
    student, teacher, valid = _masked_logits(student_logits, teacher_logits, where)
    if standardize:
        student = _standardize_logits(student)
        teacher = _standardize_logits(teacher)
    log_p_student = jax.nn.log_softmax(student / temperature, axis=-1)
    log_p_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
    loss = optax.losses.kl_divergence_with_log_targets(log_p_student, log_p_teacher)
    return jnp.where(valid, temperature**2 * loss, 0.0)


def _target_binary_log_probs(log_probs: jax.Array, is_target: jax.Array) -> jax.Array:
    """``[log p_target, log(1 - p_target)]`` per entry, shape ``(..., 2)``."""
    log_target = jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
    log_rest = jax.nn.logsumexp(log_probs, axis=-1, where=~is_target)
    return jnp.stack([log_target, log_rest], axis=-1)


def _non_target_log_probs(scaled_logits: jax.Array, is_target: jax.Array) -> jax.Array:
    """Log-softmax over the non-target classes; the target entry is set to 0."""
    log_probs = jax.nn.log_softmax(scaled_logits, axis=-1, where=~is_target)
    # The target entry is -inf; replacing it (not masking the sum) keeps gradients finite.
    return jnp.where(is_target, 0.0, log_probs)


def dkd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Decoupled knowledge distillation: :math:`\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}`.

    With :math:`p = \mathrm{softmax}(z / T)` and target class :math:`y`:

    .. math::

        b &= [p_y,\; 1 - p_y], \qquad
        \hat p_c = \frac{p_c}{1 - p_y} = \mathrm{softmax}_{c \ne y}(z_c / T), \\
        \mathrm{TCKD} &= T^2\, \mathrm{KL}(b^t \,\|\, b^s), \qquad
        \mathrm{NCKD} = T^2\, \mathrm{KL}(\hat p^t \,\|\, \hat p^s).

    Classical KD decomposes as :math:`\mathrm{KD} = \mathrm{TCKD} + (1 - p^t_y)\,\mathrm{NCKD}`.
    The official code approximates the softmax over non-target classes by subtracting 1000
    from the target logit; here the target class is excluded exactly, which agrees with it
    to float precision. Labels must lie in ``[0, C)`` (values are not checked).
    As for `kd_loss`, there is one value per entry of the leading shape, each with its
    own label.

    Reference:
        Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

    Args:
        student_logits: Student logits, shape ``(..., C)`` with ``C >= 2``: ``(B, C)`` per example, ``(B, T, C)`` per token.
        teacher_logits: Teacher logits, shape ``(..., C)``, as the student's.
        labels: Integer ground-truth classes, the leading shape ``(...)``.
        alpha: Weight of the target-class term (TCKD), ``>= 0``.
        beta: Weight of the non-target-class term (NCKD), ``>= 0``.
        temperature: Softmax temperature :math:`T > 0`.
        where: Optional boolean mask of valid entries, the leading shape ``(...)``.

    Returns:
        Unreduced loss of the leading shape ``(...)``; 0 for masked-out entries.
    """
    student, teacher = _check_logits(student_logits, teacher_logits)
    num_classes = student.shape[-1]
    if num_classes < 2:
        raise ValueError(
            f"student_logits must have at least 2 classes for DKD, got shape {student.shape}"
        )
    labels = jnp.asarray(labels)
    if labels.shape != student.shape[:-1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be an integer array of shape {student.shape[:-1]} (the leading shape "
            f"of the logits), got dtype {labels.dtype} and shape {labels.shape}"
        )
    _check_non_negative("alpha", alpha)
    _check_non_negative("beta", beta)
    _check_positive("temperature", temperature)
    student, teacher, valid = _masked_logits(student_logits, teacher_logits, where)
    labels = jnp.where(valid, labels, 0)

    is_target = labels[..., None] == jnp.arange(num_classes)
    student = student / temperature
    teacher = teacher / temperature
    tckd = optax.losses.kl_divergence_with_log_targets(
        _target_binary_log_probs(jax.nn.log_softmax(student, axis=-1), is_target),
        _target_binary_log_probs(jax.nn.log_softmax(teacher, axis=-1), is_target),
    )
    nckd = optax.losses.kl_divergence_with_log_targets(
        _non_target_log_probs(student, is_target),
        _non_target_log_probs(teacher, is_target),
    )
    loss = temperature**2 * (alpha * tckd + beta * nckd)
    return jnp.where(valid, loss, 0.0)


def init_projection(
    key: jax.Array,
    student_channels: int,
    teacher_channels: int,
    dtype: DTypeLike = jnp.float32,
) -> dict[str, jax.Array]:
    """Initialises the FitNets regressor mapping student channels to teacher channels.

    Args:
        key: PRNG key.
        student_channels: Number of student channels ``Cs``.
        teacher_channels: Number of teacher channels ``Ct``.
        dtype: Parameter dtype.

    Returns:
        ``{"kernel": (Cs, Ct), "bias": (Ct,)}`` with a LeCun-normal kernel and a zero bias.
    """
    for name, value in (
        ("student_channels", student_channels),
        ("teacher_channels", teacher_channels),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    kernel = jax.nn.initializers.lecun_normal()(key, (student_channels, teacher_channels), dtype)
    return {"kernel": kernel, "bias": jnp.zeros((teacher_channels,), dtype)}


def project(projection: Mapping[str, ArrayLike], feat: ArrayLike) -> jax.Array:
    """Applies the FitNets regressor on the last (channel) axis.

    For NHWC feature maps this is a 1x1 convolution, for ``(B, C)`` features a linear map:
    ``feat @ kernel + bias``.

    Args:
        projection: ``{"kernel": (Cs, Ct), "bias": (Ct,)}``, e.g. from `init_projection`.
        feat: Features of shape ``(..., Cs)``.

    Returns:
        Projected features of shape ``(..., Ct)``.
    """
    if not isinstance(projection, Mapping) or set(projection) != {"kernel", "bias"}:
        keys = sorted(projection) if isinstance(projection, Mapping) else type(projection)
        raise ValueError(f"projection must be a dict with keys 'kernel' and 'bias', got {keys}")
    kernel = jnp.asarray(projection["kernel"])
    bias = jnp.asarray(projection["bias"])
    feat = jnp.asarray(feat)
    if kernel.ndim != 2:
        raise ValueError(
            f"projection['kernel'] must have rank 2 (Cs, Ct), got shape {kernel.shape}"
        )
    if bias.shape != kernel.shape[1:]:
        raise ValueError(
            f"projection['bias'] must have shape ({kernel.shape[1]},) to match "
            f"projection['kernel'] of shape {kernel.shape}, got shape {bias.shape}"
        )
    if feat.ndim < 1 or feat.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"feat must have {kernel.shape[0]} channels on its last axis to match "
            f"projection['kernel'] of shape {kernel.shape}, got shape {feat.shape}"
        )
    return jnp.matmul(feat, kernel) + bias


def fitnets_loss(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    projection: Mapping[str, ArrayLike],
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""FitNets hint loss: mean squared error between regressed student and teacher features.

    .. math::

        \ell = \frac{1}{N} \sum_{k=1}^{N} \big(r(s)_k - t_k\big)^2,

    where :math:`r(s) = s W + b` is `project` applied on the channel axis and the mean runs
    over the :math:`N` non-batch elements of the teacher features. The paper writes the loss
    as :math:`\tfrac12 \|t - r(s)\|^2`; the mean (as in common implementations) makes it
    independent of the feature size.

    Reference:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    Args:
        student_feat: Student features, shape ``(B, ..., Cs)`` (e.g. NHWC or ``(B, Cs)``).
        teacher_feat: Teacher features, shape ``(B, ..., Ct)`` with the same non-channel
            shape as the student features.
        projection: ``{"kernel": (Cs, Ct), "bias": (Ct,)}``, e.g. from `init_projection`.
        where: Optional boolean mask of valid examples, shape ``(B,)``.

    Returns:
        Per-example loss, shape ``(B,)``; 0 for masked-out examples.
    """
    student, teacher = _as_float(student_feat, teacher_feat)
    _check_min_rank("student_feat", student, 2, "(batch, ..., channels)")
    _check_min_rank("teacher_feat", teacher, 2, "(batch, ..., channels)")
    valid = _valid_mask(where, student.shape[:1])
    student = project(projection, _zero_masked_rows(student, valid))
    if student.shape != teacher.shape:
        raise ValueError(
            "projected student_feat and teacher_feat must have the same shape, got "
            f"projected student_feat shape {student.shape} and teacher_feat shape "
            f"{teacher.shape}"
        )
    _check_finite_if_concrete("student_feat", student_feat, where)
    _check_finite_if_concrete("teacher_feat", teacher_feat, where)
    teacher = _zero_masked_rows(teacher, valid)
    squared_error = optax.losses.squared_error(student, teacher)
    loss = jnp.mean(squared_error.reshape(student.shape[0], -1), axis=-1)
    return jnp.where(valid, loss, 0.0)


def _attention_map(feat: jax.Array, p: float) -> jax.Array:
    """L2-normalised spatial attention map ``mean_c |A_c|^p``, shape ``(B, H*W)``."""
    attention = jnp.mean(jnp.abs(feat) ** p, axis=-1)
    return _l2_normalize(attention.reshape(feat.shape[0], -1))


def attention_transfer_loss(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    *,
    p: float = 2.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Activation-based attention transfer.

    Follows the reference implementation of the paper
    (``at(x) = normalize(x.pow(p).mean(1).view(B, -1))``,
    ``at_loss = (at(s) - at(t)).pow(2).mean()``):

    .. math::

        Q(A) &= \mathrm{vec}\Big(\frac{1}{C}\sum_{c=1}^{C} |A_c|^p\Big), \qquad
        \hat Q = \frac{Q}{\max(\|Q\|_2, 10^{-12})}, \\
        \ell &= \frac{1}{HW} \big\|\hat Q_s - \hat Q_t\big\|_2^2 .

    The difference is always squared (the paper's :math:`\|\cdot\|_p` applies to the
    reference code only for :math:`p = 2`), the mean over positions makes the value
    independent of the spatial size, and the paper's :math:`\beta / 2` weight is left to the
    caller. :math:`|A|^p` equals the reference's ``x.pow(p)`` for even :math:`p` or
    non-negative activations, and stays defined otherwise.

    Reference:
        Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
        Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017.

    Args:
        student_feat: Student feature map, shape ``(B, H, W, Cs)`` (any number ``>= 1`` of
            spatial axes between batch and channels is accepted).
        teacher_feat: Teacher feature map, shape ``(B, H, W, Ct)``; spatial shape must match
            the student's, channels may differ.
        p: Exponent :math:`p > 0` of the activations.
        where: Optional boolean mask of valid examples, shape ``(B,)``.

    Returns:
        Per-example loss, shape ``(B,)``; 0 for masked-out examples.
    """
    student, teacher = _as_float(student_feat, teacher_feat)
    layout = "(batch, *spatial, channels), e.g. NHWC"
    _check_min_rank("student_feat", student, 3, layout)
    _check_min_rank("teacher_feat", teacher, 3, layout)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            "student_feat and teacher_feat must have the same batch and spatial shape, got "
            f"student_feat shape {student.shape} and teacher_feat shape {teacher.shape}"
        )
    _check_positive("p", p)
    valid = _valid_mask(where, student.shape[:1])
    _check_finite_if_concrete("student_feat", student_feat, where)
    _check_finite_if_concrete("teacher_feat", teacher_feat, where)
    student = _attention_map(_zero_masked_rows(student, valid), p)
    teacher = _attention_map(_zero_masked_rows(teacher, valid), p)
    loss = jnp.mean(jnp.square(student - teacher), axis=-1)
    return jnp.where(valid, loss, 0.0)


def _rkd_geometry(emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pairwise distances ``(B, B)`` and angle cosines ``(B, B, B)`` of embeddings.

    ``dist[i, j] = sqrt(max(||e_j - e_i||^2, 1e-12))`` and
    ``cos[i, j, k] = <u_ij, u_ik>`` with ``u_ij = normalize(e_j - e_i)`` (zero for i == j).
    """
    diff = emb[None, :, :] - emb[:, None, :]
    squared_dist = jnp.sum(jnp.square(diff), axis=-1)
    dist = jnp.sqrt(jnp.maximum(squared_dist, _RKD_SQUARED_DIST_EPS))
    unit = _l2_normalize(diff)
    cos = jnp.einsum("ijd,ikd->ijk", unit, unit, precision=_HIGHEST)
    return dist, cos


def _normalize_distances(dist: jax.Array, off_diagonal: jax.Array) -> jax.Array:
    """Divides distances by their mean over the valid off-diagonal pairs; 0 elsewhere."""
    count = jnp.sum(off_diagonal)
    mean = jnp.sum(jnp.where(off_diagonal, dist, 0.0)) / jnp.maximum(count, 1)
    mean = jnp.where(count > 0, mean, 1.0)
    return jnp.where(off_diagonal, dist / mean, 0.0)


def rkd_loss(
    student_emb: ArrayLike,
    teacher_emb: ArrayLike,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Relational knowledge distillation: distance-wise plus angle-wise losses.

    With :math:`n` valid examples, Huber loss :math:`h` (``delta = 1``, i.e. smooth L1),
    :math:`\psi_D(i, j) = \|e_i - e_j\|_2 / \mu` where :math:`\mu` is the mean distance over
    the :math:`n(n-1)` ordered off-diagonal pairs (:math:`\psi_D(i, i) = 0`), and
    :math:`\psi_A(i, j, k) = \langle \frac{e_j - e_i}{\|e_j - e_i\|},
    \frac{e_k - e_i}{\|e_k - e_i\|} \rangle` (0 when :math:`j = i` or :math:`k = i`), the
    batch loss of the official implementation is

    .. math::

        L = \frac{w_D}{n^2} \sum_{i,j} h\big(\psi_D^s(i,j) - \psi_D^t(i,j)\big)
          + \frac{w_A}{n^3} \sum_{i,j,k} h\big(\psi_A^s(i,j,k) - \psi_A^t(i,j,k)\big),

    where the sums include the (zero) diagonal terms, as the official element-wise mean does.
    The per-example value of example :math:`i` is its row contribution, with :math:`i` as
    the vertex of the angles:

    .. math::

        \ell_i = \frac{w_D}{n} \sum_j h\big(\psi_D^s(i,j) - \psi_D^t(i,j)\big)
               + \frac{w_A}{n^2} \sum_{j,k} h\big(\psi_A^s(i,j,k) - \psi_A^t(i,j,k)\big),

    so that the mean of :math:`\ell` over the valid examples equals :math:`L`. Squared
    distances are clamped at :math:`10^{-12}` before the square root, as in the official
    ``pdist``. Memory grows as :math:`O(B^2 D + B^3)`.

    Reference:
        Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.

    Args:
        student_emb: Student embeddings, shape ``(B, Ds)``; trailing axes are flattened.
        teacher_emb: Teacher embeddings, shape ``(B, Dt)``; trailing axes are flattened.
        distance_weight: Weight :math:`w_D \ge 0` of the distance-wise loss.
        angle_weight: Weight :math:`w_A \ge 0` of the angle-wise loss.
        where: Optional boolean mask of valid examples, shape ``(B,)``; masked-out examples
            are excluded from all pairs and triplets.

    Returns:
        Per-example loss, shape ``(B,)``; 0 for masked-out examples.
    """
    student, teacher = _check_embeddings("student_emb", student_emb, "teacher_emb", teacher_emb)
    _check_non_negative("distance_weight", distance_weight)
    _check_non_negative("angle_weight", angle_weight)
    batch = student.shape[0]
    valid = _valid_mask(where, (batch,))
    _check_finite_if_concrete("student_emb", student_emb, where)
    _check_finite_if_concrete("teacher_emb", teacher_emb, where)
    student = _zero_masked_rows(student, valid)
    teacher = _zero_masked_rows(teacher, valid)
    num_valid = _num_valid(valid, student.dtype)
    pairs = valid[:, None] & valid[None, :]
    off_diagonal = pairs & ~jnp.eye(batch, dtype=bool)
    triplets = pairs[:, :, None] & valid[None, None, :]

    dist_student, cos_student = _rkd_geometry(student)
    dist_teacher, cos_teacher = _rkd_geometry(teacher)
    distance = optax.losses.huber_loss(
        _normalize_distances(dist_student, off_diagonal),
        _normalize_distances(dist_teacher, off_diagonal),
        delta=1.0,
    )
    angle = optax.losses.huber_loss(cos_student, cos_teacher, delta=1.0)
    distance = jnp.sum(jnp.where(off_diagonal, distance, 0.0), axis=-1) / num_valid
    angle = jnp.sum(jnp.where(triplets, angle, 0.0), axis=(1, 2)) / num_valid**2
    loss = distance_weight * distance + angle_weight * angle
    return jnp.where(valid, loss, 0.0)


def _pkt_conditional_probs(emb: jax.Array, pairs: jax.Array, eps: float) -> jax.Array:
    """Row-normalised cosine kernel ``(K + 1) / 2`` restricted to valid pairs, ``(B, B)``."""
    squared_norm = jnp.sum(jnp.square(emb), axis=-1, keepdims=True)
    nonzero = squared_norm > 0
    # Zero-safe square root: its gradient at 0 would otherwise be infinite.
    norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared_norm, 1.0)), 0.0)
    unit = emb / (norm + eps)
    kernel = (jnp.matmul(unit, unit.T, precision=_HIGHEST) + 1.0) / 2.0
    kernel = jnp.where(pairs, kernel, 0.0)
    row_sum = jnp.sum(kernel, axis=-1, keepdims=True)
    return kernel / jnp.where(row_sum > 0, row_sum, 1.0)


def pkt_loss(
    student_emb: ArrayLike,
    teacher_emb: ArrayLike,
    *,
    eps: float = 1e-7,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Probabilistic knowledge transfer with the cosine-similarity kernel.

    Following the official implementation, embeddings are normalised as
    :math:`\hat e = e / (\|e\|_2 + \epsilon)`, the kernel is
    :math:`K_{ij} = (\langle \hat e_i, \hat e_j \rangle + 1) / 2` (diagonal included) and
    rows are normalised to conditional probabilities :math:`q_{j|i} = K^t_{ij} / \sum_j
    K^t_{ij}` (teacher) and :math:`p_{j|i}` (student). The per-example loss is the row's
    divergence

    .. math::

        \ell_i = \sum_j q_{j|i} \log \frac{q_{j|i} + \epsilon}{p_{j|i} + \epsilon}.

    The paper's loss is :math:`\sum_i \ell_i`; the official code returns
    :math:`\frac{1}{B^2} \sum_i \ell_i`, i.e. ``jnp.mean(loss) / B`` for an unmasked batch.

    Reference:
        Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
        Transfer", ECCV 2018.

    Args:
        student_emb: Student embeddings, shape ``(B, Ds)``; trailing axes are flattened.
        teacher_emb: Teacher embeddings, shape ``(B, Dt)``; trailing axes are flattened.
        eps: Stabiliser :math:`\epsilon > 0` of the norms and of the logarithm.
        where: Optional boolean mask of valid examples, shape ``(B,)``; masked-out examples
            are excluded from the kernel rows of the others.

    Returns:
        Per-example loss, shape ``(B,)``; 0 for masked-out examples.
    """
    student, teacher = _check_embeddings("student_emb", student_emb, "teacher_emb", teacher_emb)
    _check_positive("eps", eps)
    valid = _valid_mask(where, student.shape[:1])
    _check_finite_if_concrete("student_emb", student_emb, where)
    _check_finite_if_concrete("teacher_emb", teacher_emb, where)
    pairs = valid[:, None] & valid[None, :]
    p_student = _pkt_conditional_probs(_zero_masked_rows(student, valid), pairs, eps)
    p_teacher = _pkt_conditional_probs(_zero_masked_rows(teacher, valid), pairs, eps)
    terms = p_teacher * jnp.log((p_teacher + eps) / (p_student + eps))
    return jnp.where(valid, jnp.sum(terms, axis=-1), 0.0)


def similarity_preserving_loss(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Similarity-preserving knowledge distillation.

    With :math:`A` the features flattened to ``(B, N)``, :math:`G = A A^\top` and
    :math:`\tilde G` its rows divided by :math:`\max(\|G_{i,:}\|_2, 10^{-12})`, the batch loss
    of the paper is

    .. math::

        L = \frac{1}{n^2} \big\|\tilde G_s - \tilde G_t\big\|_F^2

    over the :math:`n` valid examples, and the per-example value is the row contribution

    .. math::

        \ell_i = \frac{1}{n} \sum_j \big(\tilde G_s[i, j] - \tilde G_t[i, j]\big)^2,

    so that the mean of :math:`\ell` over the valid examples equals :math:`L`. The paper's
    weight :math:`\gamma` and the sum over layer pairs are left to the caller.

    Reference:
        Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

    Args:
        student_feat: Student features, shape ``(B, ...)``; flattened per example.
        teacher_feat: Teacher features, shape ``(B, ...)``; flattened per example.
        where: Optional boolean mask of valid examples, shape ``(B,)``; masked-out examples
            are excluded from the Gram matrices.

    Returns:
        Per-example loss, shape ``(B,)``; 0 for masked-out examples.
    """
    student, teacher = _check_embeddings("student_feat", student_feat, "teacher_feat", teacher_feat)
    valid = _valid_mask(where, student.shape[:1])
    _check_finite_if_concrete("student_feat", student_feat, where)
    _check_finite_if_concrete("teacher_feat", teacher_feat, where)
    # Zeroed rows give zero Gram rows and columns, which removes the masked-out examples.
    student = _zero_masked_rows(student, valid)
    teacher = _zero_masked_rows(teacher, valid)
    gram_student = _l2_normalize(jnp.matmul(student, student.T, precision=_HIGHEST))
    gram_teacher = _l2_normalize(jnp.matmul(teacher, teacher.T, precision=_HIGHEST))
    loss = jnp.sum(jnp.square(gram_student - gram_teacher), axis=-1)
    return jnp.where(valid, loss / _num_valid(valid, student.dtype), 0.0)
