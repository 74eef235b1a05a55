"""Meshes and shardings: data parallelism with optional rule-based param sharding.

The mesh has two axes, "data" and "model" (size 1 unless asked). Batches are
split over "data"; params, optimizer state and every other part of the train
state are replicated, except leaves that `param_rules` shard, e.g.

    [(r"params/.*/kernel", (None, "model"))]   # shard kernels' output axis

(rules as everywhere in kdq: regex over '/'-joined paths, first match wins,
None = replicated). `jit` then partitions the step itself (GSPMD). Every
sharded axis must divide evenly over its mesh axes, or `tree_shardings` raises
a ValueError naming the leaf; a rule `(path, None)` placed before keeps such a
leaf replicated. `transformer_rules` gives the rules of the usual strategies
for kdq's transformers, and `PARAM_RULES` names them for run configs.

Several hosts (cloud TPU pods, multi-node GPU): call
`initialize_distributed()` once per process before anything else touches JAX;
each process then feeds its own slice of the global batch (`shard_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdq.rules import key_path_str, match_rules

DATA_AXIS = "data"
MODEL_AXIS = "model"
STRATEGIES = ("none", "fsdp", "tensor")

ShardingRules = tuple[tuple[str, tuple[Any, ...] | None], ...]

# A path segment prefix: the rules match the model's params wherever they sit
# in the train state ("params/...", optimizer moments "opt_state/.../mu/...").
_ANY = r"(.*/)?"


def initialize_distributed() -> None:
    """Connects the processes of a multi-host job (`jax.distributed.initialize`).

    On cloud TPU pods and SLURM/Kubernetes GPU clusters the coordinator
    address, process count and index are discovered from the environment.
    """
    jax.distributed.initialize()


def make_mesh(num_devices: int = 0, model_parallel: int = 1) -> Mesh:
    """A ("data", "model") mesh over the first `num_devices` devices (0: all).

    Args:
      num_devices: how many devices to use; 0 for all of `jax.devices()`.
      model_parallel: size of the "model" axis; must divide the device count.

    Returns:
      The `Mesh`.
    """
    devices = jax.devices()
    count = num_devices or len(devices)
    if not 1 <= count <= len(devices):
        raise ValueError(
            f"num_devices={num_devices} is not in 1..{len(devices)} (the devices available)"
        )
    if model_parallel < 1 or count % model_parallel:
        raise ValueError(
            f"model_parallel={model_parallel} must be >= 1 and divide the {count} devices"
        )
    grid = np.asarray(devices[:count]).reshape(count // model_parallel, model_parallel)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def transformer_rules(strategy: str) -> ShardingRules:
    """Param sharding rules of a strategy for kdq's transformers.

    The rules match the `kdq.models.transformer` param paths (LM blocks
    `block_{i}` and encoder layers `layer_{i}`) at any depth of the train
    state, so the optimizer moments of a param are placed like the param.
    Leaves no rule matches (norm scales, the encoder's position embedding and
    layer norms, quantizer and loss state) are replicated.

    "none": every leaf replicated (plain data parallelism).

    "fsdp" (fully sharded data parallelism, ZeRO-3): the first axis of every
    kernel and embedding is split over "data", so each of the D data-parallel
    devices stores 1/D of them and of their optimizer state; `jit` gathers a
    weight where it is used and reduce-scatters its gradient.

    "tensor" (Megatron-LM, Shoeybi et al. 2019), over "model": an attention
    block splits q, k, v by output columns, i.e. by heads (heads are
    contiguous column blocks), so each device computes its heads' attention
    on its own, and o by input rows, the same heads; each device's o rows
    give a partial sum of y = sum_h a_h W_o[h], and one all-reduce completes
    it. The MLP likewise splits gate and up by columns (neurons), so silu(x
    W_gate) * (x W_up) is local, and down by rows, one all-reduce again. The
    token embedding is split by vocabulary rows and the untied output head
    by vocabulary columns (logits sharded by vocabulary); the encoder's q, k,
    v and up biases follow their kernels' columns. A split that is not a
    whole number of heads (e.g. 2 key-value heads over 4 devices) is still
    computed exactly, with more communication.

    Args:
      strategy: one of `STRATEGIES`.

    Returns:
      (regex, PartitionSpec tuple) pairs for `tree_shardings`.

    Raises:
      ValueError: `strategy` is not in `STRATEGIES`.

    >>> transformer_rules("tensor")[0]
    ('(.*/)?attn/(q|k|v)/kernel', (None, 'model'))
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
    if strategy == "none":
        return ()
    if strategy == "fsdp":
        return ((_ANY + r"(kernel|embedding)", (DATA_AXIS,)),)
    columns, rows = (None, MODEL_AXIS), (MODEL_AXIS, None)
    return (
        (_ANY + r"attn/(q|k|v)/kernel", columns),
        (_ANY + r"attn/(q|k|v)/bias", (MODEL_AXIS,)),
        (_ANY + r"attn/o/kernel", rows),
        (_ANY + r"mlp/(gate|up)/kernel", columns),
        (_ANY + r"mlp/up/bias", (MODEL_AXIS,)),
        (_ANY + r"mlp/down/kernel", rows),
        (_ANY + r"embed/embedding", rows),
        (_ANY + r"head/kernel", columns),
    )


# Rules by strategy name, for run configs (e.g. sharding.strategy="tensor").
PARAM_RULES: dict[str, ShardingRules] = {name: transformer_rules(name) for name in STRATEGIES}


def _check_divisible(path: str, shape: tuple[int, ...], spec: Any, mesh: Mesh) -> None:
    """Every axis of `shape` that `spec` shards divides by its mesh axes' total size."""
    for axis, names in enumerate(spec):
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        unknown = [name for name in names if name not in mesh.shape]
        if unknown:
            raise ValueError(
                f"sharding rule gives {tuple(spec)} for '{path}': mesh axes {unknown} are not "
                f"in the mesh {dict(mesh.shape)}"
            )
        devices = math.prod(mesh.shape[name] for name in names)
        if shape[axis] % devices:
            raise ValueError(
                f"sharding rule gives {tuple(spec)} for '{path}' of shape {shape}: axis {axis} "
                f"(size {shape[axis]}) does not split evenly over {devices} devices of mesh "
                f"axes {names}; choose sizes divisible by {devices}, or put a rule "
                f"('{path}', None) first to replicate it"
            )


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = ()) -> Any:
    """A `NamedSharding` per leaf: the rule's PartitionSpec, replicated otherwise.

    Args:
      tree: a pytree (e.g. the train state).
      mesh: the mesh.
      rules: (regex, partition spec tuple | None) over leaf paths.

    Returns:
      A pytree of `NamedSharding`s with the structure of `tree`.

    Raises:
      ValueError: a rule's spec has more axes than its leaf, names an axis
        that is not in `mesh`, or shards an axis whose size its mesh axes do
        not divide.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [key_path_str(path) for path, _ in leaves]
    specs = match_rules(paths, rules, (tuple, list)) if rules else [None] * len(paths)
    shardings = []
    for path, (_, leaf), spec in zip(paths, leaves, specs, strict=True):
        spec = spec or ()
        if len(spec) > np.ndim(leaf):
            raise ValueError(
                f"sharding rule gives {spec} for '{path}' of shape {np.shape(leaf)}: too many axes"
            )
        _check_divisible(path, np.shape(leaf), spec, mesh)
        shardings.append(NamedSharding(mesh, PartitionSpec(*spec)))
    return jax.tree_util.tree_unflatten(treedef, shardings)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a global batch with its leading axis split over "data".

    In a multi-process job each process passes the same global batch and
    contributes its own slice of it.

    Args:
      batch: {name: array with the global batch size first}.
      mesh: the mesh.

    Returns:
      {name: global `jax.Array` sharded over "data"}.
    """
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    data_size = mesh.shape[DATA_AXIS]
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % data_size:
            raise ValueError(
                f"batch size {value.shape[0]} is not divisible by the {data_size} data-parallel "
                "devices; choose a multiple"
            )
        if jax.process_count() == 1:
            out[name] = jax.device_put(value, sharding)
        else:
            per_process = value.shape[0] // jax.process_count()
            start = jax.process_index() * per_process
            out[name] = jax.make_array_from_process_local_data(
                sharding, value[start : start + per_process], value.shape
            )
    return out
