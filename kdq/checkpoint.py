"""Checkpoints: orbax `CheckpointManager` for train states, and model exports.

* Train-state checkpoints (`workdir/checkpoints/<step>`): periodic, atomic
  (orbax writes to a temporary directory and renames it), the newest N kept,
  a run resumes from the latest automatically.
* Model exports (`workdir/model/`): only what inference needs, the student's
  params, with every quantized weight stored as its integers + scale (+ zero
  point), never as a float copy; `workdir/model.json` holds the recipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kdq.quant import QArray, QuantSpec
from kdq.quant.integer import QuantizedModel
from kdq.quant.packing import pack_int4, unpack_int4
from kdq.quant.recipe import QuantRecipe


def kdq_version() -> str:
    """The installed kdq version (recorded in checkpoints).

    Returns:
      The version string.
    """
    from kdq import __version__

    return __version__


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under `path`.

    Args:
      path: a directory.

    Returns:
      The sum of the sizes of every file below it.
    """
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class StateCheckpoints:
    """Periodic train-state checkpoints in `directory`, resumable from the latest.

    Args:
      directory: where the step directories go (created if missing).
      keep: how many of the newest checkpoints to keep.
      every: save only steps that are multiples of this (others are skipped
        unless `force=True`).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, every: int):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves `state` as `step`; returns whether a checkpoint was written."""
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        self._manager.wait_until_finished()
        return saved

    def restore_latest(self, template: Any) -> Any | None:
        """The latest saved state (shaped like `template`), or None if there is none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, template)

    def restore(self, step: int, template: Any = None) -> Any:
        """The state saved at `step`, shaped like `template` (as saved when None).

        Raises:
          ValueError: the checkpoint is damaged or does not fit `template`;
            nothing on disk is changed.
        """
        target = None if template is None else _abstract(template)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax raises many types for unreadable data
            raise ValueError(
                f"checkpoint {os.path.join(self.directory, str(step))} cannot be restored into "
                f"this run's state ({type(e).__name__}: {e}). It was written by a different "
                "config or is damaged: use a new workdir, or move that step directory away "
                "to resume from the one before."
            ) from e

    def close(self) -> None:
        self._manager.close()


def export_model(workdir: str | os.PathLike, variables: Any, metadata: dict[str, Any]) -> int:
    """Writes float `variables` to `workdir/model` and `metadata` to `workdir/model.json`.

    Args:
      workdir: the run directory.
      variables: the inference variables: {"params": ..., other collections}.
      metadata: JSON-serialisable recipe (model, rules, bits, kdq version).

    Returns:
      Bytes on disk of the exported variables.
    """
    path = os.path.join(os.path.abspath(workdir), "model")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, variables, force=True)
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    return directory_bytes(path)


def load_float_variables(workdir: str | os.PathLike, template: Any) -> Any:
    """Restores float variables exported by `export_model` into the shape of `template`.

    Args:
      workdir: the run directory of the model (e.g. a teacher's run).
      template: variables of the same model (arrays or ShapeDtypeStructs).

    Returns:
      The restored variables.

    Raises:
      FileNotFoundError: no export in `workdir`; says how to make one.
      ValueError: the export does not fit `template` (another model).
    """
    path = os.path.join(os.path.abspath(workdir), "model")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no exported model at {path}: train that run first (python experiments/main.py "
            f"--config=<its config> --workdir={workdir}) or fix the workdir"
        )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, _abstract(template))
    except Exception as e:  # orbax raises many types for mismatched trees
        raise ValueError(
            f"the model exported at {path} does not fit the requested architecture "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); check the model's name and "
            "options, or re-export it with this kdq version"
        ) from e


def _encode_quantized(tree: Any) -> tuple[Any, dict[str, Any]]:
    """Arrays to save (int4 bit-packed) and the layout needed to decode them."""
    flat = flax.traverse_util.flatten_dict(
        tree, sep="/", is_leaf=lambda _, x: isinstance(x, QArray)
    )
    arrays, layout = {}, {}
    for path, leaf in flat.items():
        if not isinstance(leaf, QArray):
            arrays[path] = np.asarray(leaf)
            continue
        bits = jnp.iinfo(leaf.qvalue.dtype).bits
        qvalue = np.asarray(leaf.qvalue)
        # Sparse layout (symmetric only, where 0.0 is the integer 0): a bitmask
        # of the non-zeros and the non-zero values, when that is smaller.
        nonzero = qvalue != 0
        sparse = leaf.zero_point is None and qvalue.size + nonzero.sum() * bits < qvalue.size * bits
        if sparse:
            arrays[f"{path}/bitmask"] = np.packbits(nonzero.reshape(-1))
            qvalue = qvalue[nonzero]
        arrays[f"{path}/qvalue"] = pack_int4(qvalue) if bits == 4 else qvalue
        arrays[f"{path}/scale"] = np.asarray(leaf.scale)
        if leaf.zero_point is not None:
            zero_point = np.asarray(leaf.zero_point)
            arrays[f"{path}/zero_point"] = pack_int4(zero_point) if bits == 4 else zero_point
        layout[path] = {
            "shape": list(leaf.shape),
            "scale_shape": list(leaf.scale.shape),
            "packed_int4": bits == 4,
            "sparse": bool(sparse),
            "nonzeros": int(qvalue.size),
            "spec": dataclasses.asdict(leaf.spec),
        }
    return flax.traverse_util.unflatten_dict(arrays, sep="/"), layout


def _decode_quantized(arrays: Any, layout: dict[str, Any]) -> Any:
    flat = flax.traverse_util.flatten_dict(arrays, sep="/")
    for path, info in layout.items():
        spec = QuantSpec(**{**info["spec"], "axes": tuple(info["spec"]["axes"])})
        qvalue = flat.pop(f"{path}/qvalue")
        zero_point = flat.pop(f"{path}/zero_point", None)
        stored_shape = (info["nonzeros"],) if info["sparse"] else tuple(info["shape"])
        if info["packed_int4"]:
            qvalue = unpack_int4(qvalue, stored_shape, signed=spec.signed)
        if info["sparse"]:
            size = int(np.prod(info["shape"], dtype=np.int64))
            nonzero = np.unpackbits(flat.pop(f"{path}/bitmask"), count=size).astype(bool)
            dense = np.zeros(size, qvalue.dtype)
            dense[nonzero] = qvalue
            qvalue = dense.reshape(info["shape"])
        if info["packed_int4"]:
            if zero_point is not None:
                zero_point = unpack_int4(zero_point, tuple(info["scale_shape"]), signed=spec.signed)
        flat[path] = QArray(
            qvalue=jnp.asarray(qvalue, spec.dtype),
            scale=jnp.asarray(flat.pop(f"{path}/scale")),
            zero_point=None if zero_point is None else jnp.asarray(zero_point, spec.dtype),
            spec=spec,
        )
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def save_quantized(
    directory: str | os.PathLike, qmodel: QuantizedModel, *, metadata: dict[str, Any] | None = None
) -> int:
    """Saves a `QuantizedModel`: integers (int4 packed two per byte), scales, recipe.

    No float copy of a quantized weight is written. A pruned (sparse) weight
    of a symmetric quantizer is stored as a bitmask of its non-zeros plus the
    non-zero integers when that is smaller than the dense integers (n + nnz *
    bits < n * bits bits), so bytes on disk fall with sparsity. The directory is written
    atomically by orbax; an existing directory is replaced only once the new
    one is complete.

    Args:
      directory: the checkpoint directory.
      qmodel: the quantized model.
      metadata: extra JSON-serialisable information (e.g. the model's name).

    Returns:
      Bytes on disk of the checkpoint.
    """
    directory = os.path.abspath(directory)
    params, params_layout = _encode_quantized(qmodel.params)
    recipe_metadata = {
        "kdq_version": kdq_version(),
        "recipe": json.loads(qmodel.recipe.to_json()),
        "layout": params_layout,
        "extra": metadata or {},
    }
    tree = {
        "params": params,
        "act_scales": jax.tree_util.tree_map(np.asarray, qmodel.act_scales),
        "model_state": jax.tree_util.tree_map(np.asarray, qmodel.model_state),
    }
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            directory,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(tree), recipe=ocp.args.JsonSave(recipe_metadata)
            ),
            force=True,
        )
    return directory_bytes(directory)


def restore_quantized(
    directory: str | os.PathLike, *, expected_recipe: QuantRecipe | None = None
) -> tuple[QuantizedModel, dict[str, Any]]:
    """Restores a `QuantizedModel` saved by `save_quantized`, bit-exactly.

    Args:
      directory: the checkpoint directory.
      expected_recipe: if given, the saved recipe must equal it.

    Returns:
      (quantized model, extra metadata).

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: the checkpoint is incomplete or damaged, or its recipe
        differs from `expected_recipe`.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no quantized checkpoint at {directory}")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(
                directory,
                args=ocp.args.Composite(
                    arrays=ocp.args.StandardRestore(), recipe=ocp.args.JsonRestore()
                ),
            )
        metadata = restored["recipe"]
        recipe = QuantRecipe.from_json(json.dumps(metadata["recipe"]))
        arrays = restored["arrays"]
        params = _decode_quantized(arrays["params"], metadata["layout"])
    except Exception as e:  # orbax / tensorstore raise many types for damaged data
        raise ValueError(
            f"the quantized checkpoint at {directory} is incomplete or damaged "
            f"({type(e).__name__}: {e}); restore an earlier copy or re-export the model"
        ) from e
    if expected_recipe is not None and recipe != expected_recipe:
        raise ValueError(
            f"the checkpoint at {directory} was made with a different recipe:\n"
            f"  saved:    {recipe.to_json()}\n  expected: {expected_recipe.to_json()}"
        )
    act_scales = jax.tree_util.tree_map(jnp.asarray, arrays.get("act_scales") or {})
    model_state = jax.tree_util.tree_map(jnp.asarray, arrays.get("model_state") or {})
    qmodel = QuantizedModel(
        params=params, act_scales=act_scales, recipe=recipe, model_state=model_state
    )
    return qmodel, metadata["extra"]
