"""The main job: the embedded digits (seeds 0, 1, 2) and Shakespeare language models (seed 0).

    python -m experiments.demo --workdir=runs/demo
    python -m experiments.demo --workdir=runs/demo --results=experiments/results/demo_report.json

Image rows: the float CNN teacher; an MLP student alone, distilled (KD), and
distilled with 4-bit weights (QAT + KD); then the CNN itself quantized:
int8 post-training quantization, and 4-bit / 2-bit weights and activations
trained with LSQ + KD from the float CNN; and the CNN pruned to 2:4 sparsity
with 4-bit weights, distilled from its dense float self.

Language-model rows, on Shakespeare's bytes (`kdq.data.shakespeare`): the
teacher transformer LM; a student of 1/4 its size alone, distilled (forward
KL), distilled on its own samples (on-policy GKD), distilled with 4-bit
grouped weights and 8-bit per-token activations, and distilled at 2:4
sparsity. One seed by default (`--lm_seeds`); experiments/lm_full.py runs the
longer three-seed version with the n-gram baseline.

Each run of seed s uses the teacher of seed s of its table. Shows one progress bar per run (its stage: train, evaluate,
export), prints a table and writes `<workdir>/report.json` (the rows, which
configs and seeds ran, and the provenance: kdq commit, jax, device) and
`<workdir>/accuracy_vs_size.png`. `--results` also copies the report to a
path that is committed (`runs/` is ignored by git); `python -m
experiments.readme_tables` then writes its table into the README.
"""

import json
import os

from absl import app, flags

from experiments.tables import IMAGE_RUNS, LM_RUNS, quiet_library_logs, run_table
from kdq.report import format_table, plot_accuracy_vs_size, provenance

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the runs and report go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each image configuration.")
_LM_SEEDS = flags.DEFINE_list("lm_seeds", ["0"], "Seeds of each language-model configuration.")
_STEPS = flags.DEFINE_integer(
    "num_steps",
    None,
    "Override every run's number of steps (a quick check; warm-up is capped at half of them).",
)
_RESULTS = flags.DEFINE_string(
    "results", None, "Also write the summary report here (e.g. experiments/results/...json)."
)


def main(argv):
    del argv
    quiet_library_logs()
    workdir = os.path.abspath(_WORKDIR.value)
    seeds = [int(s) for s in _SEEDS.value]
    lm_seeds = [int(s) for s in _LM_SEEDS.value]
    configs = {}
    rows = run_table(IMAGE_RUNS, seeds, workdir, configs, num_steps=_STEPS.value)
    rows += run_table(LM_RUNS, lm_seeds, workdir, configs, num_steps=_STEPS.value)
    summary = {
        "datasets": {"classification": "digits", "language_modeling": "shakespeare_char"},
        "command": "python -m experiments.demo "
        + " ".join(
            [f"--seeds={','.join(map(str, seeds))}", f"--lm_seeds={','.join(map(str, lm_seeds))}"]
            + ([f"--num_steps={_STEPS.value}"] if _STEPS.value else [])
        ),
        "seeds": seeds,
        "lm_seeds": lm_seeds,
        "configs": configs,
        "provenance": provenance(),
        "runs": rows,
    }
    paths = [os.path.join(workdir, "report.json")]
    if _RESULTS.value:
        paths.append(os.path.abspath(_RESULTS.value))
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
            f.write("\n")
    image_rows = [row for row in rows if row["task"] == "classification"]
    plot_accuracy_vs_size(image_rows, os.path.join(workdir, "accuracy_vs_size.png"))
    print()
    print(format_table(rows))
    print("\nreport: " + ", ".join(paths))


if __name__ == "__main__":
    app.run(main)
