"""Checkpoints: orbax `CheckpointManager` for train states, and model exports.

* Train-state checkpoints (`workdir/checkpoints/<step>`): periodic, atomic
  (orbax writes to a temporary directory and renames it), the newest N kept,
  a run resumes from the newest intact one automatically.
* Model exports (`workdir/model/`): only what inference needs, the student's
  params, with every quantized weight stored as its integers densely
  bit-packed at its own width + scale (+ zero point), never as a float copy;
  `workdir/model.json` holds the recipe.

Integrity: every array written gets a SHA-256 checksum (`array_checksums`)
stored with the checkpoint (in the step's orbax metadata, the quantized
export's recipe, or `model.json`), and every restore recomputes and compares
them, so damaged bytes are an error, never silently different numbers.

Arrays are written without OCDBT (one zarr chunk file per array), so the
bytes on disk depend only on the tree and its values: OCDBT names its data
files with random ids and packs arrays in completion order, which makes the
size of the directory vary between two saves of the same tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kdq.quant import QArray, QuantSpec
from kdq.quant.integer import QuantizedModel
from kdq.quant.packing import pack_bits, unpack_bits
from kdq.quant.recipe import QuantRecipe

# Version of the quantized export layout (bumped when it changes).
QUANTIZED_FORMAT = 2


def kdq_version() -> str:
    """The installed kdq version (recorded in checkpoints).

    Returns:
      The version string.
    """
    from kdq import __version__

    return __version__


# Orbax's commit markers: their text holds the directory's absolute path.
COMMIT_MARKER = "commit_success.txt"


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under `path` (orbax metadata included).

    Orbax's commit markers (`COMMIT_MARKER`) are not counted: each holds the
    absolute path it was written to, so counting it would make the size of
    the same model depend on where its workdir is.

    Args:
      path: a directory.

    Returns:
      The sum of the sizes of every file below it, commit markers aside.
    """
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            if name != COMMIT_MARKER:
                total += os.path.getsize(os.path.join(root, name))
    return total


def payload_bytes(tree: Any) -> int:
    """Bytes the numbers of `tree` cost: its tensor payload, without any file metadata.

    A `QArray` leaf counts `QArray.nbytes`: its integers densely bit-packed
    at `spec.bits` bits (2-bit values four per byte, 3-bit eight per three
    bytes, ...), plus its scales and zero points; any other leaf counts
    size * itemsize. This is what the model costs in memory or on the wire,
    independent of how a file format lays it out or compresses it
    (`directory_bytes` measures that).

    Args:
      tree: a pytree of `QArray`s and arrays (e.g. `QuantizedModel.params` or
        float variables).

    Returns:
      The total in bytes.
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            total += leaf.nbytes
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        else:
            total += np.asarray(leaf).nbytes
    return total


def _key_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def array_checksums(tree: Any) -> dict[str, str]:
    """SHA-256 of every array leaf of `tree`, keyed by its "/"-joined path.

    The digest covers the dtype name, the shape and the C-order bytes, so a
    changed value, dtype or shape changes it. Paths use the key names only
    (dict keys, dataclass field names, sequence indices), so a tree restored
    as plain dicts has the same keys as the dataclasses it was saved from.

    Args:
      tree: a pytree of arrays.

    Returns:
      {path: hex digest}.
    """
    checksums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest = hashlib.sha256(f"{array.dtype.name}{array.shape}".encode())
        digest.update(array.tobytes())
        checksums["/".join(_key_name(entry) for entry in path)] = digest.hexdigest()
    return checksums


def _named_files(item_directory: str, paths: list[str]) -> str:
    """The arrays `paths` with the directories holding their bytes ("a/b" is in "a.b/")."""
    named = []
    for path in paths[:5]:
        files = os.path.join(item_directory, path.replace("/", "."))
        named.append(f"{path} ({files})" if os.path.isdir(files) else path)
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return ", ".join(named) + more


def _checksum_mismatches(tree: Any, expected: dict[str, str]) -> list[str]:
    """Paths whose arrays are missing, extra or differ from `expected` checksums."""
    actual = array_checksums(tree)
    return sorted(
        path for path in set(actual) | set(expected) if actual.get(path) != expected.get(path)
    )


class _DropOcdbtMergeNotice(logging.Filter):
    """Drops orbax's notice that a checkpoint written without OCDBT has nothing to merge."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ocdbt_merge_notice() -> Iterator[None]:
    logger = logging.getLogger("absl")
    notice_filter = _DropOcdbtMergeNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


def _array_handler() -> ocp.StandardCheckpointHandler:
    return ocp.StandardCheckpointHandler(use_ocdbt=False)


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class DamagedCheckpointError(ValueError):
    """A checkpoint's bytes do not match the checksums stored with it, or cannot be read."""


class StateCheckpoints:
    """Periodic train-state checkpoints in `directory`, resumable from the newest intact one.

    Each step's orbax metadata holds the SHA-256 of every array of the
    state (`array_checksums`), written atomically with the step; `restore`
    recomputes and compares them. `restore_latest` starts at the newest step;
    a damaged one (unreadable, or bytes that do not match its checksums) is
    reported by a warning naming it, moved aside to `<step>.damaged` (kept,
    never deleted or overwritten) and the step before it is tried.

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
            item_handlers=_array_handler(),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves `state` and its checksums as `step`; returns whether a checkpoint was written."""
        if not (force or self._manager.should_save(step)):
            return False
        with _quiet_ocdbt_merge_notice():
            saved = self._manager.save(
                step,
                args=ocp.args.StandardSave(state),
                force=force,
                custom_metadata={"array_sha256": array_checksums(state)},
            )
            self._manager.wait_until_finished()
        return saved

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore_latest(self, template: Any) -> Any | None:
        """The newest intact saved state (shaped like `template`), or None if there is none.

        Damaged newer steps are moved aside to `<step>.damaged` with a warning
        naming each, once an older intact step is found.

        Raises:
          ValueError: every saved step is damaged (nothing is moved), or an
            intact step does not fit `template` (another config).
        """
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, template)
            except DamagedCheckpointError as e:
                damaged.append((step, e))
                continue
            for bad_step, error in damaged:
                kept_at = self._set_aside(bad_step)
                warnings.warn(
                    f"{error}; it was moved to {kept_at} (kept, not deleted) and the run "
                    f"resumes from step {step}",
                    stacklevel=2,
                )
            return state
        if damaged:
            raise ValueError(
                f"every checkpoint in {self.directory} is damaged, so the run cannot resume:\n"
                + "\n".join(f"  {error}" for _, error in damaged)
                + "\nmove that directory away to start afresh"
            )
        return None

    def _set_aside(self, step: int) -> str:
        source = self._step_path(step)
        target, n = f"{source}.damaged", 0
        while os.path.exists(target):
            n += 1
            target = f"{source}.damaged.{n}"
        os.rename(source, target)
        self._manager.reload()
        return target

    def restore(self, step: int, template: Any = None) -> Any:
        """The state saved at `step`, shaped like `template` (as saved when None), verified.

        Raises:
          DamagedCheckpointError: the step cannot be read or its arrays do
            not match the checksums saved with it.
          ValueError: the step is intact but does not fit `template` (it was
            written by a different config). Nothing on disk is changed.
        """
        path = self._step_path(step)
        try:
            expected = self._manager.metadata(step).custom_metadata["array_sha256"]
        except Exception as e:  # orbax raises many types for unreadable metadata
            raise DamagedCheckpointError(
                f"checkpoint {path} is damaged or was written without checksums: its metadata "
                f"cannot be read ({type(e).__name__}: {_first_line(e)})"
            ) from e
        target = None if template is None else _abstract(template)
        error, mismatches = None, []
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
            mismatches = _checksum_mismatches(state, expected)
        except Exception as e:  # orbax / tensorstore raise many types for damaged data
            error = e
        if error is None and not mismatches:
            misfits = [] if template is None else _misfits(state, template)
            if not misfits:
                return state
            raise ValueError(
                f"checkpoint {path} is intact but does not fit this run's state (the arrays "
                f"{', '.join(misfits[:3])} differ in shape or dtype, or the trees differ). It was "
                "written by a different config: use a new workdir."
            )
        if template is not None and self._intact(step, expected):
            detail = (
                f"{type(error).__name__}: {_first_line(error)}"
                if error is not None
                else f"the arrays {', '.join(mismatches[:3])} differ in dtype or shape"
            )
            raise ValueError(
                f"checkpoint {path} is intact but does not fit this run's state "
                f"({detail}). It was written by a different config: use a new workdir."
            ) from error
        if error is not None:
            raise DamagedCheckpointError(
                f"checkpoint {path} is damaged: its arrays cannot be read "
                f"({type(error).__name__}: {_first_line(error)})"
            ) from error
        raise DamagedCheckpointError(
            f"checkpoint {path} is damaged: {len(mismatches)} array(s) do not match the "
            f"checksums saved with them: {_named_files(os.path.join(path, 'default'), mismatches)}"
        )

    def _intact(self, step: int, expected: dict[str, str]) -> bool:
        """Whether `step`, read as it was saved, matches its checksums."""
        try:
            saved = self._manager.restore(step, args=ocp.args.StandardRestore(None))
        except Exception:  # unreadable: damaged
            return False
        return not _checksum_mismatches(saved, expected)

    def close(self) -> None:
        self._manager.close()


def _misfits(tree: Any, template: Any) -> list[str]:
    """Paths where `tree` and `template` differ in structure, shape or dtype."""
    leaves = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    wanted = dict(jax.tree_util.tree_flatten_with_path(template)[0])
    if set(leaves) != set(wanted):
        return sorted(jax.tree_util.keystr(k) for k in set(leaves) ^ set(wanted))
    return sorted(
        jax.tree_util.keystr(k)
        for k, leaf in leaves.items()
        if np.shape(leaf) != np.shape(wanted[k])
        or np.dtype(leaf.dtype) != np.dtype(wanted[k].dtype)
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _write_json_atomically(path: str, data: dict[str, Any]) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def export_model(workdir: str | os.PathLike, variables: Any, metadata: dict[str, Any]) -> int:
    """Writes float `variables` to `workdir/model` and `metadata` to `workdir/model.json`.

    `model.json` also gets "array_sha256", the checksums of the variables
    (`array_checksums`) that `load_float_variables` verifies.

    Args:
      workdir: the run directory.
      variables: the inference variables: {"params": ..., other collections}.
      metadata: JSON-serialisable recipe (model, rules, bits, kdq version).

    Returns:
      Bytes on disk of the exported variables (`directory_bytes`).
    """
    path = os.path.join(os.path.abspath(workdir), "model")
    checksums = array_checksums(variables)
    with _quiet_ocdbt_merge_notice(), ocp.Checkpointer(_array_handler()) as checkpointer:
        checkpointer.save(path, args=ocp.args.StandardSave(variables), force=True)
    _write_json_atomically(
        os.path.join(workdir, "model.json"), {**metadata, "array_sha256": checksums}
    )
    return directory_bytes(path)


def load_float_variables(workdir: str | os.PathLike, template: Any) -> Any:
    """Restores float variables exported by `export_model` into the shape of `template`.

    The restored arrays are verified against the checksums in `model.json`.

    Args:
      workdir: the run directory of the model (e.g. a teacher's run).
      template: variables of the same model (arrays or ShapeDtypeStructs).

    Returns:
      The restored variables.

    Raises:
      FileNotFoundError: no export in `workdir`; says how to make one.
      DamagedCheckpointError: the export cannot be read, has no checksums, or
        its bytes do not match them (names the arrays).
      ValueError: the export is intact but does not fit `template` (another model).
    """
    path = os.path.join(os.path.abspath(workdir), "model")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no exported model at {path}: train that run first (python experiments/main.py "
            f"--config=<its config> --workdir={workdir}) or fix the workdir"
        )
    metadata_path = os.path.join(os.path.abspath(workdir), "model.json")
    try:
        with open(metadata_path) as f:
            expected = json.load(f)["array_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpointError(
            f"the checksums of the model exported at {path} cannot be read from {metadata_path} "
            f"({type(e).__name__}: {_first_line(e)}); re-export the model (train that run again "
            "in a new workdir)"
        ) from e
    error, mismatches = None, []
    try:
        with ocp.Checkpointer(_array_handler()) as checkpointer:
            variables = checkpointer.restore(
                path, args=ocp.args.StandardRestore(_abstract(template))
            )
        mismatches = _checksum_mismatches(variables, expected)
    except Exception as e:  # orbax raises many types for mismatched or damaged trees
        error = e
    if error is None and not mismatches:
        misfits = _misfits(variables, template)
        if not misfits:
            return variables
        raise ValueError(
            f"the model exported at {path} does not fit the requested architecture (the arrays "
            f"{', '.join(misfits[:3])} differ in shape or dtype, or the trees differ); check the "
            "model's name and options, or re-export it with this kdq version"
        )
    try:
        with ocp.Checkpointer(_array_handler()) as checkpointer:
            saved = checkpointer.restore(path, args=ocp.args.StandardRestore(None))
        saved_mismatches = _checksum_mismatches(saved, expected)
    except Exception as e:  # unreadable as saved: damaged
        raise DamagedCheckpointError(
            f"the model exported at {path} is damaged: its arrays cannot be read "
            f"({type(e).__name__}: {_first_line(e)}); re-export it or restore a copy"
        ) from e
    if saved_mismatches:
        raise DamagedCheckpointError(
            f"the model exported at {path} is damaged: the bytes of "
            f"{_named_files(path, saved_mismatches)} do not match the checksums in "
            f"{metadata_path}; "
            "re-export it or restore a copy"
        )
    detail = (
        f"{type(error).__name__}: {_first_line(error)}"
        if error is not None
        else f"{', '.join(mismatches[:3])} differ in dtype or shape"
    )
    raise ValueError(
        f"the model exported at {path} does not fit the requested architecture ({detail}); "
        "check the model's name and options, or re-export it with this kdq version"
    ) from error


def _encode_quantized(tree: Any) -> tuple[Any, dict[str, Any]]:
    """Arrays to save (integers bit-packed at their width) and the layout to decode them."""
    flat = flax.traverse_util.flatten_dict(
        tree, sep="/", is_leaf=lambda _, x: isinstance(x, QArray)
    )
    arrays, layout = {}, {}
    for path, leaf in flat.items():
        if not isinstance(leaf, QArray):
            arrays[path] = np.asarray(leaf)
            continue
        bits = leaf.spec.bits
        qvalue = np.asarray(leaf.qvalue).astype(np.int64)
        # Sparse layout (symmetric only, where 0.0 is the integer 0): a bitmask
        # of the non-zeros and the non-zero values, when that is smaller.
        nonzero = qvalue != 0
        sparse = leaf.zero_point is None and qvalue.size + nonzero.sum() * bits < qvalue.size * bits
        if sparse:
            arrays[f"{path}/bitmask"] = np.packbits(nonzero.reshape(-1))
            qvalue = qvalue[nonzero]
        arrays[f"{path}/qvalue"] = pack_bits(qvalue, bits)
        arrays[f"{path}/scale"] = np.asarray(leaf.scale)
        if leaf.zero_point is not None:
            arrays[f"{path}/zero_point"] = pack_bits(np.asarray(leaf.zero_point), bits)
        layout[path] = {
            "shape": list(leaf.shape),
            "scale_shape": list(leaf.scale.shape),
            "bits": bits,
            "sparse": bool(sparse),
            "nonzeros": int(qvalue.size),
            "spec": dataclasses.asdict(leaf.spec),
        }
    return flax.traverse_util.unflatten_dict(arrays, sep="/"), layout


def _decode_quantized(arrays: Any, layout: dict[str, Any]) -> Any:
    flat = flax.traverse_util.flatten_dict(arrays, sep="/")
    for path, info in layout.items():
        spec = QuantSpec(**{**info["spec"], "axes": tuple(info["spec"]["axes"])})
        stored_shape = (info["nonzeros"],) if info["sparse"] else tuple(info["shape"])
        qvalue = unpack_bits(
            flat.pop(f"{path}/qvalue"), stored_shape, info["bits"], signed=spec.signed
        )
        if info["sparse"]:
            size = math.prod(info["shape"])
            nonzero = np.unpackbits(flat.pop(f"{path}/bitmask"), count=size).astype(bool)
            dense = np.zeros(size, qvalue.dtype)
            dense[nonzero] = qvalue
            qvalue = dense.reshape(info["shape"])
        zero_point = flat.pop(f"{path}/zero_point", None)
        if zero_point is not None:
            zero_point = unpack_bits(
                zero_point, tuple(info["scale_shape"]), info["bits"], signed=spec.signed
            )
            zero_point = jnp.asarray(zero_point.astype(spec.dtype))
        flat[path] = QArray(
            qvalue=jnp.asarray(qvalue.astype(spec.dtype)),
            scale=jnp.asarray(flat.pop(f"{path}/scale")),
            zero_point=zero_point,
            spec=spec,
        )
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def save_quantized(
    directory: str | os.PathLike, qmodel: QuantizedModel, *, metadata: dict[str, Any] | None = None
) -> int:
    """Saves a `QuantizedModel`: integers densely bit-packed, scales, zero points, recipe.

    Each weight's integers (and zero points) are packed at the quantizer's
    own width with `kdq.quant.packing.pack_bits`: n values of b bits take
    ceil(n*b / 8) bytes (1-bit eight per byte, 2-bit four, 3-bit eight per
    three bytes, 4-bit two, 8-bit one). No float copy of a quantized weight is
    written. A pruned (sparse) weight of a symmetric quantizer is stored as a
    bitmask of its non-zeros plus the packed non-zero integers when that is
    smaller (n + nnz * b < n * b bits), so bytes on disk fall with sparsity.
    The SHA-256 of every stored array goes into the recipe metadata and is
    verified by `restore_quantized`. The directory is written atomically by
    orbax; an existing directory is replaced only once the new one is complete.

    Args:
      directory: the checkpoint directory.
      qmodel: the quantized model.
      metadata: extra JSON-serialisable information (e.g. the model's name).

    Returns:
      Bytes on disk of the checkpoint (`directory_bytes`).
    """
    directory = os.path.abspath(directory)
    params, params_layout = _encode_quantized(qmodel.params)
    tree = {
        "params": params,
        "act_scales": jax.tree_util.tree_map(np.asarray, qmodel.act_scales),
        "model_state": jax.tree_util.tree_map(np.asarray, qmodel.model_state),
        "input_transforms": jax.tree_util.tree_map(np.asarray, qmodel.input_transforms),
    }
    recipe_metadata = {
        "format": QUANTIZED_FORMAT,
        "kdq_version": kdq_version(),
        "recipe": json.loads(qmodel.recipe.to_json()),
        "layout": params_layout,
        "array_sha256": array_checksums(tree),
        "extra": metadata or {},
    }
    handler = ocp.CompositeCheckpointHandler(
        arrays=_array_handler(), recipe=ocp.JsonCheckpointHandler()
    )
    with _quiet_ocdbt_merge_notice(), ocp.Checkpointer(handler) as checkpointer:
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
    """Restores a `QuantizedModel` saved by `save_quantized`, bit-exactly and verified.

    Args:
      directory: the checkpoint directory.
      expected_recipe: if given, the saved recipe must equal it.

    Returns:
      (quantized model, extra metadata).

    Raises:
      FileNotFoundError: no checkpoint there.
      DamagedCheckpointError: the checkpoint is incomplete or damaged (its
        bytes do not match the checksums saved with it: names the arrays).
      ValueError: it was written in another layout version, or its recipe
        differs from `expected_recipe`.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no quantized checkpoint at {directory}")
    handler = ocp.CompositeCheckpointHandler(
        arrays=_array_handler(), recipe=ocp.JsonCheckpointHandler()
    )
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            restored = checkpointer.restore(
                directory,
                args=ocp.args.Composite(
                    arrays=ocp.args.StandardRestore(), recipe=ocp.args.JsonRestore()
                ),
            )
        metadata = restored["recipe"]
        arrays = restored["arrays"]
    except Exception as e:  # orbax / tensorstore raise many types for damaged data
        raise DamagedCheckpointError(
            f"the quantized checkpoint at {directory} is incomplete or damaged "
            f"({type(e).__name__}: {_first_line(e)}); restore an earlier copy or re-export the model"
        ) from e
    if not isinstance(metadata, dict) or metadata.get("format") != QUANTIZED_FORMAT:
        found = metadata.get("format", 1) if isinstance(metadata, dict) else metadata
        raise ValueError(
            f"the quantized checkpoint at {directory} has layout format {found!r}; this kdq "
            f"reads format {QUANTIZED_FORMAT}: re-export the model with this kdq version"
        )
    mismatches = _checksum_mismatches(arrays, metadata["array_sha256"])
    if mismatches:
        raise DamagedCheckpointError(
            f"the quantized checkpoint at {directory} is damaged: the bytes of "
            f"{_named_files(os.path.join(directory, 'arrays'), mismatches)} do not match the "
            "checksums saved with them; restore an earlier copy or re-export the model"
        )
    try:
        recipe = QuantRecipe.from_json(json.dumps(metadata["recipe"]))
        params = _decode_quantized(arrays["params"], metadata["layout"])
    except Exception as e:  # a layout that does not fit its verified arrays
        raise DamagedCheckpointError(
            f"the quantized checkpoint at {directory} is incomplete or damaged "
            f"({type(e).__name__}: {_first_line(e)}); restore an earlier copy or re-export the model"
        ) from e
    if expected_recipe is not None and recipe != expected_recipe:
        raise ValueError(
            f"the checkpoint at {directory} was made with a different recipe:\n"
            f"  saved:    {recipe.to_json()}\n  expected: {expected_recipe.to_json()}"
        )
    act_scales = jax.tree_util.tree_map(jnp.asarray, arrays.get("act_scales") or {})
    model_state = jax.tree_util.tree_map(jnp.asarray, arrays.get("model_state") or {})
    transforms = jax.tree_util.tree_map(jnp.asarray, arrays.get("input_transforms") or {})
    qmodel = QuantizedModel(
        params=params,
        act_scales=act_scales,
        recipe=recipe,
        model_state=model_state,
        input_transforms=transforms,
    )
    return qmodel, metadata["extra"]
