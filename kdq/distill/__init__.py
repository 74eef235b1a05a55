"""Distillation: unreduced losses (per example; per token for logits), taps, the objective."""

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
from kdq.distill.objective import FEATURE_LOSSES, LOGIT_LOSSES, Objective, Term, loss_kinds
from kdq.distill.taps import apply_with_taps, module_paths

__all__ = [
    "FEATURE_LOSSES",
    "LOGIT_LOSSES",
    "Objective",
    "Term",
    "apply_with_taps",
    "attention_transfer_loss",
    "dkd_loss",
    "fitnets_loss",
    "init_projection",
    "kd_loss",
    "loss_kinds",
    "module_paths",
    "pkt_loss",
    "project",
    "rkd_loss",
    "similarity_preserving_loss",
]
