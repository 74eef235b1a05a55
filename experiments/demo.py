"""The main job on the embedded digits, every configuration with seeds 0, 1, 2.

    python -m experiments.demo --workdir=runs/demo
    python -m experiments.demo --workdir=runs/demo --results=experiments/results/demo_report.json

Rows: the float CNN teacher; an MLP student alone, distilled (KD), and
distilled with 4-bit weights (QAT + KD); then the CNN itself quantized:
int8 post-training quantization, and 4-bit / 2-bit weights and activations
trained with LSQ + KD from the float CNN; and the CNN pruned to 2:4 sparsity
with 4-bit weights, distilled from its dense float self. Each run of seed s uses the teacher
of seed s. Shows one progress bar per run (its stage: train, evaluate,
export), prints a table and writes `<workdir>/report.json` (the rows, which
configs and seeds ran, and the provenance: kdq commit, jax, device) and
`<workdir>/accuracy_vs_size.png`. `--results` also copies the report to a
path that is committed (`runs/` is ignored by git); `python -m
experiments.readme_tables` then writes its table into the README.
"""

import json
import logging
import os

from absl import app, flags
from absl import logging as absl_logging

from experiments.configs import (
    digits_kd,
    digits_prune_2of4_w4_kd,
    digits_ptq_w8a8,
    digits_qat_kd,
    digits_qat_w2a2_kd,
    digits_qat_w4a4_kd,
    digits_student,
    digits_teacher,
)
from kdq.report import format_table, plot_accuracy_vs_size, provenance, summarize
from kdq.train import quantize_and_evaluate, train_and_evaluate

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the runs and report go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each configuration.")
_STEPS = flags.DEFINE_integer(
    "num_steps",
    None,
    "Override every run's number of steps (a quick check; warm-up is capped at half of them).",
)
_RESULTS = flags.DEFINE_string(
    "results", None, "Also write the summary report here (e.g. experiments/results/...json)."
)

RUNS = [
    ("teacher", digits_teacher),
    ("student", digits_student),
    ("student_kd", digits_kd),
    ("student_w4_kd", digits_qat_kd),
    ("ptq_w8a8", digits_ptq_w8a8),
    ("qat_w4a4_kd", digits_qat_w4a4_kd),
    ("qat_w2a2_kd", digits_qat_w2a2_kd),
    ("pruned_2of4_w4_kd", digits_prune_2of4_w4_kd),
]
# The entry point of each config's `entry_point`: PTQ rows are quantized, not trained.
ENTRY_POINTS = {"train": train_and_evaluate, "ptq": quantize_and_evaluate}


def quiet_library_logs() -> None:
    """Keeps library INFO logs (orbax writes several per checkpoint, through absl) off the terminal."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "jax", "tensorstore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv):
    del argv
    quiet_library_logs()
    workdir = os.path.abspath(_WORKDIR.value)
    seeds = [int(s) for s in _SEEDS.value]
    rows, configs = [], {}
    for name, config_module in RUNS:
        reports = []
        for seed in seeds:
            config = config_module.get_config()
            config.seed = seed
            config.progress = True
            if _STEPS.value:
                config.num_steps = _STEPS.value
                config.optimizer.warmup_steps = min(
                    config.optimizer.warmup_steps, _STEPS.value // 2
                )
            teacher_workdir = os.path.join(workdir, f"teacher_seed{seed}")
            if config.teacher.workdir:
                config.teacher.workdir = teacher_workdir
            if config.init_from:
                config.init_from = teacher_workdir
            run = ENTRY_POINTS[config.entry_point]
            reports.append(run(config, os.path.join(workdir, f"{name}_seed{seed}")))
        configs[name] = {
            "config": f"experiments/configs/{config_module.__name__.rsplit('.', 1)[-1]}.py",
            "num_steps": config.num_steps,
        }
        rows.append(summarize(name, reports))
    summary = {
        "dataset": "digits",
        "command": "python -m experiments.demo "
        + " ".join(
            [f"--seeds={','.join(map(str, seeds))}"]
            + ([f"--num_steps={_STEPS.value}"] if _STEPS.value else [])
        ),
        "seeds": seeds,
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
    plot_accuracy_vs_size(rows, os.path.join(workdir, "accuracy_vs_size.png"))
    print()
    print(format_table(rows))
    print("\nreport: " + ", ".join(paths))


if __name__ == "__main__":
    app.run(main)
