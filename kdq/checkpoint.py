"""Checkpoints: orbax `CheckpointManager` for train states, and model exports.

* Train-state checkpoints (`workdir/checkpoints/<step>`): periodic, atomic
  (orbax writes to a temporary directory and renames it), the newest N kept,
  a run resumes from the latest automatically.
* Model exports (`workdir/model/`): only what inference needs, the student's
  params, with every quantized weight stored as its integers + scale (+ zero
  point), never as a float copy; `workdir/model.json` holds the recipe.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from kdq.quant import QArray


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under `path`."""
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
        if step is None:
            return None
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(template)))
        except Exception as e:  # orbax raises many types for unreadable data
            raise ValueError(
                f"checkpoint {os.path.join(self.directory, str(step))} cannot be restored into "
                f"this run's state ({type(e).__name__}: {e}). It was written by a different "
                "config or is damaged: use a new workdir, or move that step directory away "
                "to resume from the one before."
            ) from e

    def close(self) -> None:
        self._manager.close()


def _export_tree(tree: Any) -> Any:
    """Replaces each QArray by a dict of its integer/scale leaves (no None)."""

    def convert(leaf):
        if not isinstance(leaf, QArray):
            return leaf
        fields = {"qvalue": leaf.qvalue, "scale": leaf.scale}
        if leaf.zero_point is not None:
            fields["zero_point"] = leaf.zero_point
        return fields

    return jax.tree_util.tree_map(convert, tree, is_leaf=lambda x: isinstance(x, QArray))


def export_model(workdir: str | os.PathLike, params: Any, metadata: dict[str, Any]) -> int:
    """Writes `params` (arrays and/or QArrays) to `workdir/model` and the recipe.

    Args:
      workdir: the run directory.
      params: the inference params; quantized weights as `QArray`s.
      metadata: JSON-serialisable recipe (model, rules, bits, kdq version).

    Returns:
      Bytes on disk of the exported params.
    """
    path = os.path.join(os.path.abspath(workdir), "model")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, _export_tree(params), force=True)
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    return directory_bytes(path)


def load_float_params(workdir: str | os.PathLike, template: Any) -> Any:
    """Restores float params exported by `export_model` into the shape of `template`.

    Args:
      workdir: the run directory of the model (e.g. a teacher's run).
      template: params of the same model (arrays or ShapeDtypeStructs).

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
            f"({type(e).__name__}: {e}); check the teacher's name and options"
        ) from e
