"""A run's directory: the config it was started with, and whether it may be resumed.

`<workdir>/config.json` is written once every part of the run has been built
from the config, so a config that fails leaves no trace that would refuse
its corrected version. A run started again in the same workdir must have the
same config (`progress` aside).

The config names its entry point (`config.entry_point`: "train" for
`train_and_evaluate`, "ptq" for `quantize_and_evaluate`), so neither entry
point runs the other's config or overwrites the other's workdir.

Workdirs written before the trainer had tasks (their config.json has a
`mode` field, no `task`, no `entry_point` and no
`optimizer.quant_learning_rate`) are read with those fields upgraded: `mode`
becomes `entry_point` (a "train" run resumes under `train_and_evaluate`),
the others take the values that reproduce what such a run did.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from kdq.train.setup import check_dataset

# Fields added since config.json first had a layout, with the value that
# reproduces what a run of that layout did.
_ADDED_FIELDS = {
    ("task",): "classification",
    ("entry_point",): "train",
    ("optimizer", "quant_learning_rate"): 0.0,
}
_ENTRY_POINTS = {
    "train": "kdq.train.train_and_evaluate (python -m experiments.main)",
    "ptq": "kdq.train.quantize_and_evaluate (python -m experiments.ptq)",
}


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as the JSON object written to config.json."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _upgrade(previous: dict[str, Any]) -> dict[str, Any]:
    """A config.json of an earlier layout in today's layout (see the module docstring)."""
    if "mode" not in previous:
        return previous
    previous = dict(previous)
    previous["entry_point"] = previous.pop("mode")
    for path, value in _ADDED_FIELDS.items():
        section = previous
        for part in path[:-1]:
            section = section.setdefault(part, {})
        section.setdefault(path[-1], value)
    return previous


def previous_config(workdir: str) -> dict[str, Any] | None:
    """The config.json of the run in `workdir` (upgraded), or None when there is none yet.

    Args:
      workdir: the run directory.

    Raises:
      ValueError: the file is unreadable.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            previous = json.load(f)
        problem = None if isinstance(previous, dict) else f"a JSON {type(previous).__name__}"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise ValueError(
            f"{path} is unreadable ({problem}), so the run in {workdir} cannot be resumed: "
            "it was damaged or not written by kdq. Use a new --workdir, or delete "
            f"{workdir} to start over"
        )
    return _upgrade(previous)


def check_same_config(workdir: str, previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuses to resume a run with a config other than its own (`progress` aside).

    `num_steps` counts: the cosine schedule spans it, so a longer resumed run
    would follow another learning-rate curve than the steps it already took.
    """
    changed = sorted(
        k
        for k in set(previous) | set(current)
        if k != "progress" and previous.get(k) != current.get(k)
    )
    if not changed:
        return
    hint = ""
    if "num_steps" in changed:
        hint = (
            f" config.num_steps is {current.get('num_steps')!r} here but "
            f"{previous.get('num_steps')!r} in that run, and the learning-rate schedule spans "
            "num_steps, so a run cannot be extended in place: train longer in a new "
            "workdir (a float run's exported model can initialise it: "
            f"--config.init_from={workdir})."
        )
    raise ValueError(
        f"{workdir} holds a run with a different config (fields {changed} differ); "
        f"use a new --workdir, or delete the old one to start over.{hint}"
    )


def write_config(workdir: str, current: dict[str, Any]) -> None:
    """Creates `workdir` and writes config.json."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)


def _given_dataset(dataset: Any) -> dict[str, Any]:
    """What config.json records of a dataset passed instead of `config.dataset`."""
    check_dataset(dataset)
    splits = ("train", "validation", "test")
    return {
        "name": dataset.name,
        "num_classes": dataset.num_classes,
        "features": repr(dataset.features),
        "examples": {
            s: None if getattr(dataset, s) is None else len(getattr(dataset, s)) for s in splits
        },
    }


def check_resumable(
    config: ml_collections.ConfigDict, workdir: str, entry: str, dataset: Any = None
) -> tuple[str, dict[str, Any], bool]:
    """Checks that `config` may run in `workdir` (new, or the same config) for `entry`.

    A dataset passed instead of `config.dataset` is recorded as the config's
    "dataset" (its name, classes, features and split sizes), so a run resumed
    on other data is refused.

    Args:
      config: the run's config.
      workdir: the run directory.
      entry: "train" or "ptq", the entry point asking.
      dataset: the `kdq.data.Dataset` given to the entry point, or None.

    Returns:
      (absolute workdir, the config's JSON object for `write_config`, whether
      the workdir holds no run yet).

    Raises:
      ValueError: the config or the workdir's run belongs to the other entry
        point, or the workdir's run has another config.
    """
    if config.entry_point != entry:
        raise ValueError(
            f"config.entry_point={config.entry_point!r}: the config is written for "
            f"{_ENTRY_POINTS[config.entry_point]}, not for {_ENTRY_POINTS[entry]}; run it "
            "with that entry point"
        )
    workdir = os.path.abspath(workdir)
    current = config_json(config)
    if dataset is not None:
        current["dataset"] = _given_dataset(dataset)
    previous = previous_config(workdir)
    if previous is not None:
        theirs = previous.get("entry_point")
        if theirs != entry:
            raise ValueError(
                f"{workdir} holds a run of {_ENTRY_POINTS.get(theirs, repr(theirs))}, not of "
                f"{_ENTRY_POINTS[entry]}; use that entry point, or a new --workdir"
            )
        check_same_config(workdir, previous, current)
    return workdir, current, previous is None
