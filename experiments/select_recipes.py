"""Chooses the digits recipes on the validation split, never on test.

    python -m experiments.select_recipes --workdir=runs/selection \
        --out=experiments/results/recipe_selection.json

Each decision trains every candidate with seeds 0 and 1 and keeps the one
with the highest mean validation accuracy (ties: the lower mean validation
loss). Test accuracy is recorded beside it for the reader, and plays no part
in the choice. The decisions run in order, each on top of the choices before
it:

  teacher_augment  the CNN teacher with or without random crops
                   (`augment.crop_padding`, 0 or 1 pixel);
  kd               the MLP student's distillation term: logit
                   standardisation on or off, temperature 1, 2 or 4;
  w2a2_kd_weight   the weight of KD (against cross-entropy) in the 2-bit
                   LSQ QAT of the CNN: 0.5 or 0.8.

The configs in `experiments/configs/` hold the chosen values, and
`tests/recipe_selection_test.py` checks them against the committed result.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import numpy as np
from absl import app, flags, logging

from experiments.configs import digits_kd, digits_qat_w2a2_kd, digits_teacher
from kdq.report import provenance
from kdq.train import train_and_evaluate

_WORKDIR = flags.DEFINE_string("workdir", "runs/selection", "Where the candidate runs go.")
_OUT = flags.DEFINE_string(
    "out", "experiments/results/recipe_selection.json", "Where the selection is written."
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of every candidate.")

KD_CANDIDATES = [
    {"losses.kd.standardize": standardize, "losses.kd.temperature": temperature}
    for standardize, temperature in itertools.product((False, True), (1.0, 2.0, 4.0))
]
DECISIONS = [
    ("teacher_augment", digits_teacher, [{"augment.crop_padding": p} for p in (0, 1)]),
    ("kd", digits_kd, KD_CANDIDATES),
    (
        "w2a2_kd_weight",
        digits_qat_w2a2_kd,
        [{"losses.kd.weight": w, "losses.ce.weight": round(1.0 - w, 6)} for w in (0.5, 0.8)],
    ),
]


def candidate_name(values: dict[str, Any]) -> str:
    """A directory-safe name for one candidate's field values."""
    return ",".join(f"{field.rsplit('.', 1)[-1]}={value}" for field, value in values.items())


def run_candidate(config_module, values, chosen_teacher, workdir, seed) -> dict[str, Any]:
    """Trains one candidate with one seed; returns its report."""
    config = config_module.get_config()
    config.update_from_flattened_dict(values)
    config.seed = seed
    config.progress = False
    teacher_workdir = chosen_teacher.get(seed)
    if config.teacher.workdir:
        config.teacher.workdir = teacher_workdir
    if config.init_from:
        config.init_from = teacher_workdir
    return train_and_evaluate(config, workdir)


def best_candidate(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate of highest mean validation accuracy (ties: lowest validation loss)."""
    return max(candidates, key=lambda c: (c["val_accuracy"], -c["val_loss"]))


def main(argv):
    del argv
    # absl logs at INFO once flags are parsed; orbax writes several lines per checkpoint.
    logging.set_verbosity(logging.WARNING)
    seeds = [int(s) for s in _SEEDS.value]
    root = os.path.abspath(_WORKDIR.value)
    chosen_teacher: dict[int, str] = {}
    decisions = []
    for decision, config_module, candidate_values in DECISIONS:
        candidates = []
        for values in candidate_values:
            reports = {
                seed: run_candidate(
                    config_module,
                    values,
                    chosen_teacher,
                    os.path.join(root, decision, f"{candidate_name(values)}_seed{seed}"),
                    seed,
                )
                for seed in seeds
            }
            candidates.append(
                {
                    "values": values,
                    "val_accuracy": float(np.mean([r["val_accuracy"] for r in reports.values()])),
                    "val_loss": float(np.mean([r["val_loss"] for r in reports.values()])),
                    "val_accuracy_by_seed": [reports[s]["val_accuracy"] for s in seeds],
                    "test_accuracy": float(np.mean([r["test_accuracy"] for r in reports.values()])),
                    "workdirs": {
                        str(s): os.path.join(root, decision, f"{candidate_name(values)}_seed{s}")
                        for s in seeds
                    },
                }
            )
            print(
                f"{decision} {candidate_name(values)}: val {candidates[-1]['val_accuracy']:.4f} "
                f"(test {candidates[-1]['test_accuracy']:.4f})",
                flush=True,
            )
        best = best_candidate(candidates)
        if decision == "teacher_augment":
            chosen_teacher = {s: best["workdirs"][str(s)] for s in seeds}
        for candidate in candidates:
            del candidate["workdirs"]
        decisions.append({"name": decision, "candidates": candidates, "chosen": best["values"]})
        print(f"{decision}: chose {candidate_name(best['values'])}", flush=True)
    result = {
        "selected_on": "validation",
        "rule": "highest mean val_accuracy over the seeds; ties: lowest mean val_loss",
        "seeds": seeds,
        "decisions": decisions,
        "provenance": provenance(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)
    print(f"selection: {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
