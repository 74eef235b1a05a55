"""Meshes and shardings: data parallelism with optional rule-based param sharding.

The mesh has two axes, "data" and "model" (size 1 unless asked). Batches are
split over "data"; params, optimizer state and every other part of the train
state are replicated, except leaves that `param_rules` shard, e.g.

    [(r"params/.*/kernel", (None, "model"))]   # shard kernels' output axis

(rules as everywhere in kdq: regex over '/'-joined paths, first match wins,
None = replicated). `jit` then partitions the step itself (GSPMD).

Several hosts (cloud TPU pods, multi-node GPU): call
`initialize_distributed()` once per process before anything else touches JAX;
each process then feeds its own slice of the global batch (`shard_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdq.rules import key_path_str, match_rules

DATA_AXIS = "data"
MODEL_AXIS = "model"


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


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = ()) -> Any:
    """A `NamedSharding` per leaf: the rule's PartitionSpec, replicated otherwise.

    Args:
      tree: a pytree (e.g. the train state).
      mesh: the mesh.
      rules: (regex, partition spec tuple | None) over leaf paths.

    Returns:
      A pytree of `NamedSharding`s with the structure of `tree`.
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
