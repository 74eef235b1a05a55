"""Pruning: importance masks, sparsity schedules and an optax pruning transform.

`Pruning` names the schedule, rules and scope of a run's pruning together.
"""

from kdq.prune.masks import (
    PruneSpec,
    SparsityReport,
    apply_masks,
    magnitude_mask,
    sparsity_of,
    tree_masks,
)
from kdq.prune.schedules import (
    SparsitySchedule,
    constant_schedule,
    one_shot_schedule,
    polynomial_schedule,
    polynomial_sparsity,
)
from kdq.prune.transform import PruneState, Pruning, masked_pruning, masks_from_state

__all__ = [
    "PruneSpec",
    "PruneState",
    "Pruning",
    "SparsityReport",
    "SparsitySchedule",
    "apply_masks",
    "constant_schedule",
    "magnitude_mask",
    "masked_pruning",
    "masks_from_state",
    "one_shot_schedule",
    "polynomial_schedule",
    "polynomial_sparsity",
    "sparsity_of",
    "tree_masks",
]
