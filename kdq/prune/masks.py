"""Pruning masks: which weights of a Flax param pytree are set to zero.

A mask is a bool array shaped like its weight: True keeps a weight, False
prunes it. A *mask tree* has the structure of the params with a mask at every
leaf that the rules select for pruning and None at every other leaf. None is an
empty pytree node, so a mask tree flattens to its masks only, carries no memory
for unpruned leaves, and passes through `jax.jit`, `jax.lax.cond` and optax
states unchanged. Map it against params with the params first, e.g.
`jax.tree.map(lambda p, m: p if m is None else ..., params, masks)`.

Kernels follow the Flax layout: Dense `(in, out)`, Conv `(..., in, out)`. The
output channels are the last axis; the contraction (input-channel) axis is -2.

Structured pruning of transformers removes whole units exactly by zeroing rows
of the kernel that reads them. Attention with H heads of width Dh computes
y = concat_h(a_h) @ W_o = sum_h a_h @ W_o[h*Dh:(h+1)*Dh], so zeroing the h-th
block of Dh rows of W_o (structure "heads", group_size=Dh) removes head h's
term whatever a_h is; likewise an MLP down(phi(x)) = sum_j phi_j(x) W_down[j]
loses exactly neuron j when row j of W_down is zeroed (structure "neurons").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdq.rules import Rules, key_path_str, match_rules

STRUCTURES = ("unstructured", "channel", "n:m", "heads", "neurons")
# Structures that prune groups of `group_size` consecutive input rows (axis -2).
ROW_GROUP_STRUCTURES = ("heads", "neurons")
# Structures whose leaves scope="global" ranks together (one pool per structure).
POOLED_STRUCTURES = ("unstructured", *ROW_GROUP_STRUCTURES)
NORMS = ("l1", "l2")
IMPORTANCES = ("magnitude", "taylor")
SCOPES = ("layer", "global")
# floor(s * G) counts s * G within this relative distance of an integer as that
# integer, so that float rounding (0.57 * 100 = 56.99999999999999) and float32
# sparsities give the intended count.
_FLOOR_SLACK = 1e-6


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_concrete_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _is_python_scalar(x: Any) -> bool:
    """A host-side scalar (bools included, so that validation rejects them)."""
    return isinstance(x, int | float | np.number | np.bool_)


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    """Validates a python sparsity: a real number in [0, 1).

    Args:
      value: the sparsity to check.
      name: the argument name used in the error message.

    Returns:
      `value` as a float.
    """
    if not _is_concrete_number(value) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {name}={value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneSpec:
    """How to prune one weight array.

    Importance of each weight w with gradient g:
      "magnitude": |w|
      "taylor":    |w * g|, the first-order Taylor estimate of the change of
                   the loss when w is set to zero (Molchanov et al., 2019).

    Structures, for a kernel `(..., in, out)`:
      "unstructured": the k = round(sparsity * w.size) weights of smallest
        importance are pruned (round half to even).
      "channel": whole output channels (the last axis) are pruned: the
        k = round(sparsity * out) channels whose importances have the smallest
        L1 norm (sum_i |a_i|) or L2 norm (sqrt(sum_i a_i^2)) over all other axes.
      "n:m": in every group of M consecutive weights along the contraction axis
        (-2), the N of largest importance are kept and the M - N others pruned
        (N:M sparsity, e.g. 2:4). The sparsity is 1 - N/M, fixed by n and m.
      "heads" and "neurons": whole groups of `group_size` consecutive rows of
        the contraction axis (-2) are pruned. With G = in / group_size groups,
        the k = floor(sparsity * G) groups whose importances have the smallest
        L1 or L2 norm over the group's rows (and all other axes) are zeroed
        (a product sparsity * G within 1e-6 relative of an integer counts as
        that integer, against float rounding).
        Rounding down never prunes more than `sparsity` of such coarse units
        (k / G <= sparsity). "heads" is meant for an attention output kernel
        o (H * Dh, d) with group_size = Dh, the head width: its H row blocks
        are the heads, and zeroing one removes that head's contribution
        exactly (see the module docstring); the head's q, k, v columns then
        no longer affect the output. "neurons" is meant for an MLP down
        kernel (mlp_dim, d): one neuron per row (group_size 1 by default),
        or blocks of `group_size` neurons.

    Ties are broken deterministically: among equal importances (or equal
    channel or group norms) the element with the lower row-major index is pruned first,
    i.e. elements are ranked by a stable sort on (importance, index).

    Attributes:
      sparsity: fraction to prune, in [0, 1), for every structure but "n:m";
        None to leave it to the caller (e.g. a `SparsitySchedule`). Must be None
        for "n:m".
      structure: one of `STRUCTURES`.
      n: weights kept per group ("n:m" only), 1 <= n <= m.
      m: group size ("n:m" only); must divide the contraction axis.
      group_size: rows per pruned group ("heads": required, the head width;
        "neurons": 1 by default); must divide the contraction axis. None for
        the other structures.
      norm: "l1" or "l2", the channel or group norm ("channel", "heads",
        "neurons").
      importance: "magnitude" or "taylor" (needs the gradient).

    Raises:
      ValueError: a field is out of range or does not fit `structure`.
    """

    sparsity: float | None = None
    structure: str = "unstructured"
    n: int | None = None
    m: int | None = None
    group_size: int | None = None
    norm: str = "l2"
    importance: str = "magnitude"

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("structure", self.structure, STRUCTURES),
            ("norm", self.norm, NORMS),
            ("importance", self.importance, IMPORTANCES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")
        self._check_n_m()
        self._check_group_size()
        if self.structure != "n:m" and self.sparsity is not None:
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))

    def _check_n_m(self) -> None:
        if self.structure != "n:m":
            if self.n is not None or self.m is not None:
                raise ValueError(
                    f"n and m are for structure 'n:m' only, got n={self.n!r}, m={self.m!r} with "
                    f"structure={self.structure!r}"
                )
            return
        if self.sparsity is not None:
            raise ValueError(
                "an 'n:m' spec takes its sparsity 1 - n/m from n and m; leave sparsity=None, "
                f"got sparsity={self.sparsity!r}"
            )
        for name, value in (("n", self.n), ("m", self.m)):
            if not _is_int(value) or value < 1:
                raise ValueError(
                    f"structure 'n:m' needs {name} >= 1 (an int), got {name}={value!r}"
                )
        if self.n > self.m:
            raise ValueError(
                f"n must be <= m (n non-zeros in every group of m), got n={self.n}, m={self.m}"
            )
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "m", int(self.m))

    def _check_group_size(self) -> None:
        if self.structure not in ROW_GROUP_STRUCTURES:
            if self.group_size is not None:
                raise ValueError(
                    f"group_size is for structures {ROW_GROUP_STRUCTURES} only, got "
                    f"group_size={self.group_size!r} with structure={self.structure!r}"
                )
            return
        if self.group_size is None and self.structure == "neurons":
            object.__setattr__(self, "group_size", 1)
        if not _is_int(self.group_size) or self.group_size < 1:
            hint = " (the head width, head_dim)" if self.structure == "heads" else ""
            raise ValueError(
                f"structure {self.structure!r} needs group_size >= 1 (an int){hint}, got "
                f"group_size={self.group_size!r}"
            )
        object.__setattr__(self, "group_size", int(self.group_size))


def _prune_count(sparsity: Any, size: int, *, floor: bool = False) -> Any:
    """k = round(sparsity * size), or floor(sparsity * (1 + 1e-6) * size) when
    `floor`: in python arithmetic when `sparsity` is a python number, in
    float32 when it is an array; clipped to [0, size]."""
    if _is_python_scalar(sparsity):
        product = check_sparsity(sparsity) * size
        return min(math.floor(product * (1 + _FLOOR_SLACK)) if floor else round(product), size)
    product = jnp.asarray(sparsity, jnp.float32) * size
    k = jnp.floor(product * (1 + _FLOOR_SLACK)) if floor else jnp.round(product)
    return jnp.clip(k.astype(jnp.int32), 0, size)


def _keep_largest(scores: jax.Array, k: Any) -> jax.Array:
    """Keep mask of a 1-D `scores` pruning the k smallest by (score, index)."""
    order = jnp.argsort(scores, stable=True)
    ranks = jnp.zeros(scores.shape, jnp.int32).at[order].set(jnp.arange(scores.size))
    return ranks >= k


def _importance(w: jax.Array, spec: PruneSpec, grad: Any, where: str) -> jax.Array:
    w = w.astype(jnp.float32)
    if spec.importance == "magnitude":
        return jnp.abs(w)
    if grad is None:
        raise ValueError(f"importance='taylor' needs the gradient of {where}, got grad=None")
    grad = jnp.asarray(grad)
    if grad.shape != w.shape:
        raise ValueError(
            f"the gradient of {where} has shape {grad.shape}, the weight has shape {w.shape}"
        )
    return jnp.abs(w * grad.astype(jnp.float32))


def _check_kernel(w: jax.Array, spec: PruneSpec, where: str) -> None:
    if w.ndim < 2:
        raise ValueError(
            f"structure {spec.structure!r} needs a kernel with at least 2 axes (..., in, out), "
            f"got {where} with shape {w.shape}"
        )
    for name, size in (("m", spec.m), ("group_size", spec.group_size)):
        if size is not None and w.shape[-2] % size:
            raise ValueError(
                f"{name}={size} must divide the contraction axis (axis -2) of {where}, "
                f"shape {w.shape}: size {w.shape[-2]}"
            )


def _norm(values: jax.Array, axis: Any, norm: str) -> jax.Array:
    """sum |v| ("l1") or sqrt(sum v^2) ("l2") of non-negative `values` over `axis`."""
    if norm == "l1":
        return jnp.sum(values, axis=axis)
    return jnp.sqrt(jnp.sum(values**2, axis=axis))


def _channel_keep(importance: jax.Array, spec: PruneSpec, sparsity: Any) -> jax.Array:
    scores = _norm(importance, tuple(range(importance.ndim - 1)), spec.norm)
    keep = _keep_largest(scores, _prune_count(sparsity, scores.size))
    return jnp.broadcast_to(keep, importance.shape)


def _row_group_scores(importance: jax.Array, spec: PruneSpec) -> jax.Array:
    """(G,) norms of the G = in / group_size row groups of an `(..., in, out)` array."""
    rows = jnp.moveaxis(importance, -2, 0)
    groups = rows.reshape(rows.shape[0] // spec.group_size, -1)
    return _norm(groups, 1, spec.norm)


def _expand_row_groups(keep: jax.Array, shape: tuple[int, ...], group_size: int) -> jax.Array:
    """A (G,) group keep vector as a mask of `shape` (..., in, out): row r follows group r // gs."""
    return jnp.broadcast_to(jnp.repeat(keep, group_size)[:, None], shape)


def _row_group_keep(importance: jax.Array, spec: PruneSpec, sparsity: Any) -> jax.Array:
    scores = _row_group_scores(importance, spec)
    keep = _keep_largest(scores, _prune_count(sparsity, scores.size, floor=True))
    return _expand_row_groups(keep, importance.shape, spec.group_size)


def _nm_keep(importance: jax.Array, n: int, m: int) -> jax.Array:
    swapped = jnp.swapaxes(importance, -1, -2)  # (..., out, in)
    groups = swapped.reshape(*swapped.shape[:-1], swapped.shape[-1] // m, m)
    # argsort of the sorting permutation is its inverse: each element's rank in its group.
    ranks = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1, stable=True)
    keep = (ranks >= m - n).reshape(swapped.shape)
    return jnp.swapaxes(keep, -1, -2)


def magnitude_mask(
    w: jax.Array,
    spec: PruneSpec,
    *,
    grad: jax.Array | None = None,
    sparsity: float | jax.Array | None = None,
    name: str = "w",
) -> jax.Array:
    """The keep mask of one weight array (True = kept), by importance.

    See `PruneSpec` for the importance, the structures and the tie-breaking.

    Args:
      w: the weight; a kernel `(..., in, out)` for every structure but
        "unstructured".
      spec: how to prune.
      grad: dL/dw, required when `spec.importance == "taylor"`.
      sparsity: overrides `spec.sparsity` (every structure but "n:m"); may
        be a traced scalar (then the count k is computed in float32 and
        clipped to [0, size]), e.g. a schedule's value.
      name: how error messages call `w`.

    Returns:
      A bool array of `w.shape`.
    """
    w = jnp.asarray(w)
    if spec.structure != "unstructured":
        _check_kernel(w, spec, name)
    importance = _importance(w, spec, grad, name)
    if spec.structure == "n:m":
        return _nm_keep(importance, spec.n, spec.m)
    if sparsity is None:
        sparsity = spec.sparsity
    if sparsity is None:
        raise ValueError(
            f"the spec of {name} has sparsity=None: give PruneSpec(sparsity=...) or pass sparsity="
        )
    if spec.structure == "channel":
        return _channel_keep(importance, spec, sparsity)
    if spec.structure in ROW_GROUP_STRUCTURES:
        return _row_group_keep(importance, spec, sparsity)
    return _keep_largest(importance.ravel(), _prune_count(sparsity, w.size)).reshape(w.shape)


def _shared(specs: list[PruneSpec], paths: list[str], field: str, structure: str) -> Any:
    """The one value of `field` over the specs of a global pool, or a ValueError."""
    values = {getattr(spec, field) for spec in specs}
    if len(values) != 1 or None in values:
        shown = ", ".join(f"{p}: {getattr(s, field)}" for p, s in zip(paths, specs, strict=True))
        override = " (or sparsity=...)" if field == "sparsity" else ""
        raise ValueError(
            f"scope='global' needs one {field} shared by all {structure} specs{override}, "
            f"as it ranks their layers together; got {shown}"
        )
    return values.pop()


def _global_masks(
    leaves: list[jax.Array],
    specs: list[PruneSpec],
    grads: list[Any],
    paths: list[str],
    sparsity: Any,
) -> list[jax.Array]:
    """Masks of leaves of one structure ("unstructured", "heads" or "neurons")
    sharing one ranking: of all their weights, or of all their row groups."""
    structure = specs[0].structure
    grouped = structure in ROW_GROUP_STRUCTURES
    if sparsity is None:
        sparsity = _shared(specs, paths, "sparsity", structure)
    for field in ("importance", "norm") if grouped else ("importance",):
        _shared(specs, paths, field, structure)
    scores = []
    for w, spec, grad, path in zip(leaves, specs, grads, paths, strict=True):
        w = jnp.asarray(w)
        if grouped:
            _check_kernel(w, spec, f"'{path}'")
        importance = _importance(w, spec, grad, f"'{path}'")
        scores.append(_row_group_scores(importance, spec) if grouped else importance.ravel())
    keep = _keep_largest(
        jnp.concatenate(scores),
        _prune_count(sparsity, sum(x.size for x in scores), floor=grouped),
    )
    bounds = np.cumsum([0] + [x.size for x in scores])
    return [
        _expand_row_groups(keep[lo:hi], jnp.shape(w), spec.group_size)
        if grouped
        else keep[lo:hi].reshape(jnp.shape(w))
        for w, spec, lo, hi in zip(leaves, specs, bounds[:-1], bounds[1:], strict=True)
    ]


def _check_floating(paths: list[str], leaves: list[Any], specs: list[Any]) -> None:
    for path, leaf, spec in zip(paths, leaves, specs, strict=True):
        if spec is not None and not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            raise ValueError(
                f"rules select '{path}' for pruning, but it has dtype {jnp.asarray(leaf).dtype}; "
                "only floating-point leaves can be pruned"
            )


def tree_masks(
    params: Any,
    rules: Rules,
    *,
    grads: Any = None,
    scope: str = "layer",
    sparsity: float | jax.Array | None = None,
) -> Any:
    """The mask tree of `params`: a keep mask per leaf selected by `rules`.

    With scope="layer" every selected leaf is masked on its own by
    `magnitude_mask`. With scope="global" the leaves of each structure in
    `POOLED_STRUCTURES` are ranked together, one pool per structure:
    "unstructured" leaves by weight, with n_total their total size the
    k = round(s * n_total) weights of smallest importance over all of them
    are pruned (one threshold; ties broken by leaf order, then row-major
    index), so layers of small weights lose more than s and layers of large
    weights less; "heads" (or "neurons") leaves by row group, with G_total
    their total number of groups the k = floor(s * G_total) groups of smallest
    norm are pruned, so a layer may lose all of its heads or none. A pool
    needs one sparsity, importance and (groups) norm. "channel" and "n:m"
    leaves are always masked per layer.

    Args:
      params: pytree of float arrays.
      rules: (regex, PruneSpec | None) pairs matched against leaf paths
        (see `kdq.rules`).
      grads: pytree like `params` with the loss gradient; required when a
        selected spec has importance="taylor".
      scope: "layer" or "global".
      sparsity: overrides the sparsity of every spec but "n:m" ones; may be
        a traced scalar.

    Returns:
      A pytree with the structure of `params`: bool keep masks at selected
      leaves, None elsewhere.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got scope={scope!r}")
    if _is_python_scalar(sparsity):
        check_sparsity(sparsity)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [key_path_str(path) for path, _ in leaves_with_paths]
    leaves = [leaf for _, leaf in leaves_with_paths]
    specs = match_rules(paths, rules, PruneSpec)
    grad_leaves = [None] * len(leaves) if grads is None else treedef.flatten_up_to(grads)
    _check_floating(paths, leaves, specs)
    masks: list[Any] = [None] * len(leaves)
    for structure in POOLED_STRUCTURES if scope == "global" else ():
        pool = [i for i, spec in enumerate(specs) if spec and spec.structure == structure]
        if pool:
            pooled_masks = _global_masks(
                *([values[i] for i in pool] for values in (leaves, specs, grad_leaves, paths)),
                sparsity,
            )
            for i, mask in zip(pool, pooled_masks, strict=True):
                masks[i] = mask
    for i, spec in enumerate(specs):
        if spec is not None and masks[i] is None:
            masks[i] = magnitude_mask(
                leaves[i], spec, grad=grad_leaves[i], sparsity=sparsity, name=f"'{paths[i]}'"
            )
    return jax.tree_util.tree_unflatten(treedef, masks)


def apply_masks(params: Any, masks: Any) -> Any:
    """Sets the pruned weights to exactly +0.0: where(mask, w, 0) per masked leaf.

    Args:
      params: pytree of arrays.
      masks: a mask tree of `params` (None leaves are left unchanged).

    Returns:
      A pytree like `params`, same dtypes.
    """
    return jax.tree.map(
        lambda w, mask: w if mask is None else jnp.where(mask, w, jnp.zeros((), w.dtype)),
        params,
        masks,
    )


class SparsityReport(NamedTuple):
    """Achieved sparsity (fraction of pruned elements).

    Attributes:
      per_layer: leaf path -> fraction pruned in that leaf.
      overall: total pruned / total elements over the reported leaves.
      pruned: number of pruned elements over the reported leaves.
      total: number of elements of the reported leaves.
    """

    per_layer: dict[str, float]
    overall: float
    pruned: int
    total: int


def sparsity_of(tree: Any, rules: Rules | None = None) -> SparsityReport:
    """Reports the sparsity of a mask tree or of params (host-side, not jittable).

    A bool leaf is a mask: its pruned elements are the False ones. Any other
    leaf is a weight: its pruned elements are the exact zeros. None leaves
    (unselected in a mask tree) are skipped.

    Args:
      tree: a mask tree or a pytree of params.
      rules: if given, only the leaves these (regex, PruneSpec | None) rules
        select are reported; by default every leaf is.

    Returns:
      A `SparsityReport` (overall is 0.0 when no element is reported).
    """
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [key_path_str(path) for path, _ in leaves_with_paths]
    selected = [True] * len(paths) if rules is None else match_rules(paths, rules, PruneSpec)
    per_layer, pruned, total = {}, 0, 0
    for path, (_, leaf), spec in zip(paths, leaves_with_paths, selected, strict=True):
        if spec is None:
            continue
        leaf = np.asarray(leaf)
        count = int(np.sum(~leaf)) if leaf.dtype == np.bool_ else int(np.sum(leaf == 0))
        per_layer[path] = count / leaf.size if leaf.size else 0.0
        pruned += count
        total += leaf.size
    return SparsityReport(per_layer, pruned / total if total else 0.0, pruned, total)
