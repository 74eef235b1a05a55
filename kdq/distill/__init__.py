"""Distillation: unreduced losses (per example; per token for logits), taps, the objective."""

from kdq.distill.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from kdq.distill.losses import (
    attention_transfer_loss,
    dkd_loss,
    fitnets_loss,
    init_projection,
    kd_loss,
    pkt_loss,
    project,
    rkd_loss,
    similarity_preserving_loss,
)
from kdq.distill.objective import (
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    TOKEN_FEATURE_LOSSES,
    Objective,
    Term,
    loss_kinds,
)
from kdq.distill.relations import attention_relation_loss, hidden_state_loss
from kdq.distill.taps import apply_with_taps, module_paths

__all__ = [
    "FEATURE_LOSSES",
    "LOGIT_LOSSES",
    "TOKEN_FEATURE_LOSSES",
    "Objective",
    "Term",
    "apply_with_taps",
    "attention_relation_loss",
    "attention_transfer_loss",
    "dkd_loss",
    "fitnets_loss",
    "forward_kl",
    "generalized_jsd",
    "hidden_state_loss",
    "init_projection",
    "kd_loss",
    "loss_kinds",
    "module_paths",
    "pkt_loss",
    "project",
    "reverse_kl",
    "rkd_loss",
    "similarity_preserving_loss",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
]
