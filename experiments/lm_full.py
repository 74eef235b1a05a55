"""The full language-model study on Shakespeare: three seeds, every divergence, the n-gram baseline.

    python -m experiments.lm_full --workdir=runs/lm_full
    python -m experiments.lm_full --workdir=runs/lm_full --seeds=0 --num_steps=300   # a quick look

Runs, each with every seed (a student of seed s distils from the teacher of
seed s):

- the demo's language-model table (`experiments.LM_RUNS`): teacher,
  student alone, KD (forward KL), on-policy GKD, W4 (groups of 32) A8 QAT +
  KD, 2:4 pruning + KD;
- the divergences side by side, each the only loss term: forward KL,
  reverse KL, generalized JSD (beta 0.5), skew KL and skew reverse KL
  (alpha 0.1, DistiLLM), total variation;
- the genre classifier (`shakespeare_genre_encoder.py`) with its chance levels;
- the smoothed 5-gram baseline (`experiments.ngram.KneserNey`) fitted on the
  same train plays and scored on every byte of the validation and test plays.

Prints the tables, the gap each distilled student closes,
(student - kd) / (student - teacher) in test bits per byte, which divergence
wins on validation, and the wall time; writes `<workdir>/report.json`.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from experiments.configs import shakespeare_genre_encoder, shakespeare_lm_kd
from experiments.ngram import KneserNey
from experiments.tables import LM_RUNS, quiet_library_logs, run_table
from kdq.data import load_dataset
from kdq.data.shakespeare import GENRES, load_plays
from kdq.report import format_table, provenance

_WORKDIR = flags.DEFINE_string("workdir", "runs/lm_full", "Where the runs and report go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each configuration.")
_STEPS = flags.DEFINE_integer("num_steps", None, "Override every run's number of steps.")

DIVERGENCES = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.5},
    "skew_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "total_variation": {},
}


def _divergence_config(kind: str, options: dict):
    def get_config():
        config = shakespeare_lm_kd.get_config()
        config.losses = {kind: {"weight": 1.0, **options}}
        return config

    return get_config


class _Module:
    """A config module stand-in: a name and `get_config`."""

    def __init__(self, name: str, get_config):
        self.__name__ = f"experiments.configs.shakespeare_lm_kd[{name}]"
        self.get_config = get_config


def ngram_baseline(order: int = 5) -> dict[str, float]:
    """Bits per byte of the Kneser-Ney byte n-gram on the validation and test plays."""
    start = time.perf_counter()
    plays = {role: [r["text"] for r in records] for role, records in load_plays().items()}
    model = KneserNey(plays["train"], order=order)
    return {
        "order": order,
        "val_bits_per_byte": model.bits_per_byte(plays["validation"]),
        "test_bits_per_byte": model.bits_per_byte(plays["test"]),
        "seconds": time.perf_counter() - start,
    }


def genre_chance_levels() -> dict[str, float]:
    """1 / 6, and the share of each held-out split's passages in its largest genre."""
    data = load_dataset("shakespeare_genre")
    levels = {"uniform": 1 / len(GENRES)}
    for split in ("validation", "test"):
        source = getattr(data, split)
        counts = np.bincount([source[i]["label"] for i in range(len(source))])
        levels[f"{split}_majority"] = float(counts.max() / counts.sum())
    return levels


def _gaps(rows: list[dict]) -> dict[str, float]:
    """The fraction of the student-teacher gap in test bits per byte each distilled row closes."""
    by_name = {row["name"]: row["test_bits_per_byte"] for row in rows}
    teacher, student = by_name["lm_teacher"], by_name["lm_student"]
    return {
        name: (student - value) / (student - teacher)
        for name, value in by_name.items()
        if name not in ("lm_teacher", "lm_student")
    }


def main(argv):
    del argv
    quiet_library_logs()
    start = time.perf_counter()
    workdir = os.path.abspath(_WORKDIR.value)
    seeds = [int(s) for s in _SEEDS.value]
    configs: dict = {}
    runs = list(LM_RUNS) + [
        (f"lm_{kind}", _Module(kind, _divergence_config(kind, options)))
        for kind, options in DIVERGENCES.items()
    ]
    rows = run_table(runs, seeds, workdir, configs, num_steps=_STEPS.value)
    genre = run_table(
        [("genre_encoder", shakespeare_genre_encoder)],
        seeds,
        workdir,
        configs,
        num_steps=_STEPS.value,
    )
    baseline = ngram_baseline()
    gaps = _gaps(rows)
    divergences = {
        f"lm_{k}": r["val_bits_per_byte"]
        for r in rows
        for k in DIVERGENCES
        if r["name"] == f"lm_{k}"
    }
    report = {
        "command": f"python -m experiments.lm_full --seeds={','.join(map(str, seeds))}"
        + (f" --num_steps={_STEPS.value}" if _STEPS.value else ""),
        "seeds": seeds,
        "configs": configs,
        "ngram_baseline": baseline,
        "gap_closed": gaps,
        "best_divergence_on_validation": min(divergences, key=divergences.get),
        "genre_chance": genre_chance_levels(),
        "wall_seconds": time.perf_counter() - start,
        "provenance": provenance(),
        "runs": rows + genre,
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    print(format_table(rows + genre))
    print(
        f"\n5-gram Kneser-Ney baseline: val {baseline['val_bits_per_byte']:.3f}, "
        f"test {baseline['test_bits_per_byte']:.3f} bits/byte"
    )
    print("gap closed (test bits/byte): " + ", ".join(f"{k} {v:.1%}" for k, v in gaps.items()))
    print(f"best divergence on validation: {report['best_divergence_on_validation']}")
    print(f"genre chance levels: {report['genre_chance']}")
    print(f"wall time: {report['wall_seconds'] / 60:.1f} min; report: {workdir}/report.json")


if __name__ == "__main__":
    app.run(main)
