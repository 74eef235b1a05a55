"""The optimizer of a run: learning-rate schedule, optimizer, clipping, pruning.

    tx = make_optimizer(config, pruning)   # over TrainState.trainable

is the chain, in order,

    clip_by_global_norm(grad_clip_norm)     when grad_clip_norm > 0, over all of the tree
    adamw | adam | sgd                      weight decay on "params" and "distill" only
    pruning.transform()                     when pruning is not None; last, so pruned
                                            weights stay exactly zero

The tree the optimizer updates has the subtrees `TRAINABLE` = ("params",
"quant", "distill"). With optimizer.quant_learning_rate = 0 one optimizer
updates all of it under one learning-rate schedule. With
quant_learning_rate > 0, `optax.multi_transform` gives the quantizer state
("quant": LSQ steps, PACT clips) its own optimizer of the same kind, with that
peak learning rate under the same warmup and schedule shape, and its own
moments. (Under Adam a constant factor on a gradient cancels, so the LSQ
gradient scale g = 1 / sqrt(N * Q_P) alone does not change the step sizes'
effective learning rate; this option does.)
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from kdq.prune import Pruning
from kdq.train.state import TRAINABLE

# The label of each trainable subtree in the per-subtree optimizer.
_LABELS = {name: "quant" if name == "quant" else "rest" for name in TRAINABLE}


def learning_rate_schedule(config: ml_collections.ConfigDict, peak: float) -> optax.Schedule:
    """The learning rate at each step, rising to `peak` and shaped by config.optimizer.

    With W = optimizer.warmup_steps and T = num_steps, the rate at step t is
    peak * t / W for t < W (linear warmup from 0), then

      "cosine":   peak * (1 + cos(pi * min(t - W, T - W) / (T - W))) / 2, reaching 0 at T;
      "constant": peak.

    Args:
      config: a run config (its `optimizer` section and `num_steps`).
      peak: the learning rate at the end of the warmup.

    Returns:
      An optax schedule (step -> learning rate).

    Raises:
      ValueError: config.optimizer.schedule is not "cosine" or "constant".
    """
    opt = config.optimizer
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, opt.warmup_steps, config.num_steps)
    if opt.schedule == "constant":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, opt.warmup_steps),
                optax.constant_schedule(peak),
            ],
            [opt.warmup_steps],
        )
    raise ValueError(
        f"config.optimizer.schedule must be 'cosine' or 'constant', got {opt.schedule!r}"
    )


def _decay_mask(trainable: dict[str, Any]) -> dict[str, Any]:
    """Weight decay on the params and loss params, never on quantizer state."""
    return {
        name: jax.tree_util.tree_map(lambda _, decay=name != "quant": decay, tree)
        for name, tree in trainable.items()
    }


def _optimizer(
    opt: ml_collections.ConfigDict, learning_rate: optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer `opt.name` under `learning_rate`, weight decay masked by `_decay_mask`."""
    if opt.name == "adamw":
        return optax.adamw(learning_rate, weight_decay=opt.weight_decay, mask=_decay_mask)
    if opt.name == "adam":
        return optax.adam(learning_rate)
    if opt.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
            optax.sgd(learning_rate, momentum=opt.momentum, nesterov=True),
        )
    raise ValueError(f"config.optimizer.name must be 'adamw', 'adam' or 'sgd', got {opt.name!r}")


def make_optimizer(
    config: ml_collections.ConfigDict, pruning: Pruning | None
) -> optax.GradientTransformation:
    """The optax optimizer of a run: schedule, optimizer, clipping, pruning.

    See the module docstring for the chain and the per-subtree learning rate.

    Args:
      config: a run config (its `optimizer` section and `num_steps`).
      pruning: the run's pruning (`kdq.train.config.pruning(config)`), or None.

    Returns:
      The optax transformation over `TrainState.trainable` (a dict keyed by
      `TRAINABLE`); weight decay spares the quantizer state, and pruning (if
      any) comes last.

    Raises:
      ValueError: an optimizer name or schedule the config schema does not have.
    """
    opt = config.optimizer
    tx = _optimizer(opt, learning_rate_schedule(config, opt.learning_rate))
    if opt.quant_learning_rate:
        quant_tx = _optimizer(opt, learning_rate_schedule(config, opt.quant_learning_rate))
        tx = optax.multi_transform({"rest": tx, "quant": quant_tx}, _LABELS)
    if opt.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    if pruning is not None:
        tx = optax.chain(tx, pruning.transform())
    return tx
