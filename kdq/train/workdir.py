"""A run's directory: the config it was started with, and whether it may be resumed.

`<workdir>/config.json` is written once every part of the run has been built
from the config, so a config that fails leaves no trace that would refuse
its corrected version. A run started again in the same workdir must have the
same config (`progress` aside).

Workdirs written before the trainer had tasks (their config.json has a
`mode` field, no `task` and no `optimizer.quant_learning_rate`) are read
with those fields upgraded: a "train" run resumes under `train_and_evaluate`,
a "ptq" run belongs to `quantize_and_evaluate`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

# Fields added since config.json first had a layout, with the value that
# reproduces what a run of that layout did.
_ADDED_FIELDS = {("task",): "classification", ("optimizer", "quant_learning_rate"): 0.0}
_ENTRY_POINTS = {
    "train": "kdq.train.train_and_evaluate (python -m experiments.main)",
    "ptq": "kdq.train.quantize_and_evaluate (python -m experiments.ptq)",
}


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as the JSON object written to config.json."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _upgrade(previous: dict[str, Any], workdir: str, entry: str) -> dict[str, Any]:
    """A config.json of an earlier layout in today's layout (see the module docstring)."""
    if "mode" not in previous:
        return previous
    previous = dict(previous)
    mode = previous.pop("mode")
    if mode != entry:
        raise ValueError(
            f"{workdir} holds a config.mode={mode!r} run, which belongs to "
            f"{_ENTRY_POINTS.get(mode, 'no entry point of kdq')}, not to {_ENTRY_POINTS[entry]}; "
            "use that entry point, or a new --workdir"
        )
    for path, value in _ADDED_FIELDS.items():
        section = previous
        for part in path[:-1]:
            section = section.setdefault(part, {})
        section.setdefault(path[-1], value)
    return previous


def previous_config(workdir: str, entry: str) -> dict[str, Any] | None:
    """The config.json of the run in `workdir` (upgraded), or None when there is none yet.

    Args:
      workdir: the run directory.
      entry: "train" or "ptq", the entry point asking.

    Raises:
      ValueError: the file is unreadable, or the run belongs to the other entry point.
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
    return _upgrade(previous, workdir, entry)


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


def check_resumable(
    config: ml_collections.ConfigDict, workdir: str, entry: str
) -> tuple[str, dict[str, Any], bool]:
    """Checks that `config` may run in `workdir` (new, or the same config) for `entry`.

    Args:
      config: the run's config.
      workdir: the run directory.
      entry: "train" or "ptq", the entry point asking.

    Returns:
      (absolute workdir, the config's JSON object for `write_config`, whether
      the workdir holds no run yet).
    """
    workdir = os.path.abspath(workdir)
    current = config_json(config)
    previous = previous_config(workdir, entry)
    if previous is not None:
        check_same_config(workdir, previous, current)
    return workdir, current, previous is None
