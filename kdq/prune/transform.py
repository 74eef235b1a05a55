"""Pruning during training as an optax `GradientTransformation`.

    tx = optax.chain(
        optax.adamw(1e-3, weight_decay=1e-4),
        masked_pruning(polynomial_schedule(initial=0.0, final=0.8, begin=1000,
                                           end=9000, frequency=500),
                       [(r".*/kernel", PruneSpec())]),
    )

Whole attention heads and MLP neurons of a transformer (`PruneSpec` structures
"heads" and "neurons"), e.g. half the heads of width 64 and 30% of the neurons:

    masked_pruning(one_shot_schedule(0.5, begin=1000),
                   [(r".*/attn/o/kernel", PruneSpec(structure="heads", group_size=64))])
    masked_pruning(one_shot_schedule(0.3, begin=1000),
                   [(r".*/mlp/down/kernel", PruneSpec(structure="neurons"))])

Pruning must come last in the chain: it rewrites the final updates so that
params + updates is exactly 0.0 at every pruned weight. A transform after it
(momentum, weight decay, a learning-rate scale) would move pruned weights off
zero again. Several `masked_pruning` transforms may be chained (e.g. different
schedules for different layers); their masks combine by logical AND.

`Pruning(schedule, rules, scope)` names the three inputs of one such
transform, e.g. the pruning a run config asks for: `.transform()` builds it and
`.sparsity(params)` measures what it achieved.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kdq.prune.masks import SCOPES, PruneSpec, sparsity_of, tree_masks
from kdq.prune.schedules import SparsitySchedule
from kdq.rules import Rules, compile_rules, key_path_str, match_rules


class PruneState(NamedTuple):
    """State of `masked_pruning`.

    Attributes:
      count: number of `update` calls so far (int32 scalar): the step t that
        the schedule is evaluated at in the next call.
      masks: the current mask tree (see `kdq.prune.masks`): bool keep masks at
        the pruned leaves, None elsewhere; all True before the first update step.
    """

    count: jax.Array
    masks: Any


def _check_schedule_and_scope(schedule: Any, scope: Any) -> None:
    if not isinstance(schedule, SparsitySchedule):
        raise ValueError(
            f"schedule must be a SparsitySchedule, got {type(schedule).__name__}: {schedule!r}"
        )
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got scope={scope!r}")


def masked_pruning(
    schedule: SparsitySchedule, rules: Rules, *, scope: str = "layer"
) -> optax.GradientTransformationExtraArgs:
    """Prunes params by importance on a schedule and keeps the pruned weights at zero.

    `update(updates, state, params, *, grads=None)` at step t = state.count:

    1. If t is an update step of `schedule`, the masks are recomputed from the
       current `params` (the values before this update) by `tree_masks` with
       sparsity s(t) (see `kdq.prune.schedules`); otherwise they are kept.
    2. The returned updates are u' = where(mask, u, -params): a kept weight gets
       its update unchanged, a pruned one gets -w, so params + u' is exactly 0.0
       there (w - w == +0.0 in IEEE arithmetic).

    Specs select the layers, structure, norm and importance; the schedule sets
    the sparsity of every layer but the "n:m" ones ("unstructured", "channel",
    "heads", "neurons"), so their `PruneSpec.sparsity` must be None. "n:m"
    layers get their fixed N:M pattern at every update step. A pruned head or
    neuron scores 0 at the next update step, so with a non-decreasing schedule
    it stays pruned. Taylor importance needs the raw loss gradient, which
    the last transform of a chain does not see: pass it as the extra argument
    `grads` (`optax.chain` forwards it), `tx.update(g, state, params, grads=g)`.

    Args:
      schedule: when to recompute the masks and at which sparsity.
      rules: (regex, PruneSpec | None) pairs matched against leaf paths.
      scope: "layer" or "global" (see `tree_masks`).

    Returns:
      A `GradientTransformationExtraArgs` whose state is a `PruneState`; read
      the masks with `masks_from_state`.
    """
    _check_schedule_and_scope(schedule, scope)
    rules = list(rules)

    def leaf_specs(params: Any) -> list[PruneSpec | None]:
        paths = [key_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        specs = match_rules(paths, rules, PruneSpec)
        for path, spec in zip(paths, specs, strict=True):
            if spec is not None and spec.sparsity is not None:
                raise ValueError(
                    f"masked_pruning takes the sparsity from its schedule, but the spec of "
                    f"'{path}' has sparsity={spec.sparsity}; use PruneSpec(sparsity=None)"
                )
        return specs

    def init_fn(params: Any) -> PruneState:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        masks = [
            None if spec is None else jnp.ones(jnp.shape(leaf), bool)
            for leaf, spec in zip(leaves, leaf_specs(params), strict=True)
        ]
        return PruneState(
            count=jnp.zeros((), jnp.int32), masks=jax.tree_util.tree_unflatten(treedef, masks)
        )

    def update_fn(
        updates: Any, state: PruneState, params: Any = None, *, grads: Any = None, **extra_args
    ) -> tuple[Any, PruneState]:
        del extra_args
        if params is None:
            raise ValueError("masked_pruning needs the params: call update(updates, state, params)")
        specs = leaf_specs(params)
        if grads is None and any(s is not None and s.importance == "taylor" for s in specs):
            raise ValueError(
                "importance='taylor' needs the loss gradient: call "
                "update(updates, state, params, grads=grads)"
            )

        def recompute() -> Any:
            return tree_masks(
                params, rules, grads=grads, scope=scope, sparsity=schedule(state.count)
            )

        masks = jax.lax.cond(schedule.is_update_step(state.count), recompute, lambda: state.masks)
        new_updates = jax.tree.map(
            lambda u, mask, w: u if mask is None else jnp.where(mask, u, -w.astype(u.dtype)),
            updates,
            masks,
            params,
        )
        return new_updates, PruneState(count=optax.safe_increment(state.count), masks=masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class Pruning:
    """The pruning of a training run: what `masked_pruning` is built from.

    The rules select leaves of the tree the optimizer updates, the
    `TrainState.trainable` dict {"params", "quant", "distill"} of kdq's
    trainer, so a rule over the model's params reads "params/(<regex>)".

    Attributes:
      schedule: when the masks are recomputed and at which sparsity.
      rules: (regex, PruneSpec | None) pairs over the updated tree's leaf
        paths (stored as a tuple of pairs).
      scope: "layer" or "global" (see `tree_masks`).

    Raises:
      ValueError: `schedule` is not a `SparsitySchedule`, `scope` is not in
        `SCOPES`, or a rule is not a (valid regex, PruneSpec | None) pair.
    """

    schedule: SparsitySchedule
    rules: tuple[tuple[str, PruneSpec | None], ...]
    scope: str = "layer"

    def __post_init__(self) -> None:
        _check_schedule_and_scope(self.schedule, self.scope)
        compile_rules(self.rules, PruneSpec, name="rules")
        object.__setattr__(self, "rules", tuple(tuple(rule) for rule in self.rules))

    def transform(self) -> optax.GradientTransformationExtraArgs:
        """The `masked_pruning` transform; it goes last in the optimizer chain."""
        return masked_pruning(self.schedule, self.rules, scope=self.scope)

    def sparsity(self, params: Any) -> float:
        """Overall sparsity of the pruned leaves of a model's params.

        With P the leaves of {"params": params} that `rules` select, this is
        sum_{w in P} #{w == 0} / sum_{w in P} size(w) (0.0 when P is empty):
        `sparsity_of({"params": params}, rules).overall`.

        Raises:
          ValueError: no rule matches a leaf of {"params": params}.
        """
        return sparsity_of({"params": params}, self.rules).overall


def _is_none(x: Any) -> bool:
    return x is None


def masks_from_state(opt_state: optax.OptState) -> Any:
    """The mask tree held by the `masked_pruning` transform(s) in an optimizer state.

    Args:
      opt_state: the state of a transform containing `masked_pruning` (e.g. an
        `optax.chain`), searched at any depth.

    Returns:
      The mask tree; the masks of several `masked_pruning` states are combined
      by logical AND (a leaf none of them prunes stays None).
    """
    states = [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
        if isinstance(s, PruneState)
    ]
    if not states:
        raise ValueError("opt_state holds no PruneState: it is not from masked_pruning")
    combined, treedef = jax.tree_util.tree_flatten(states[0].masks, is_leaf=_is_none)
    for state in states[1:]:
        other = treedef.flatten_up_to(state.masks)
        combined = [
            b if a is None else a if b is None else a & b
            for a, b in zip(combined, other, strict=True)
        ]
    return jax.tree_util.tree_unflatten(treedef, combined)
