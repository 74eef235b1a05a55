"""The main job on the embedded digits, every configuration with seeds 0, 1, 2.

    python -m experiments.demo --workdir=runs/demo

Rows: the float CNN teacher; an MLP student alone, distilled (KD), and
distilled with 4-bit weights (QAT + KD); then the CNN itself quantized:
int8 post-training quantization, and 4-bit / 2-bit weights and activations
trained with LSQ + KD from the float CNN; and the CNN pruned to 2:4 sparsity
with 4-bit weights, distilled from its dense float self. Each run of seed s uses the teacher
of seed s. Prints a table and writes `<workdir>/report.json` and
`<workdir>/accuracy_vs_size.png`.
"""

import json
import os

from absl import app, flags, logging

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
from kdq.report import format_table, plot_accuracy_vs_size, summarize
from kdq.train import train_and_evaluate

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the runs and report go.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each configuration.")
_STEPS = flags.DEFINE_integer("num_steps", None, "Override every run's number of steps.")

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


def main(argv):
    del argv
    workdir = os.path.abspath(_WORKDIR.value)
    rows = []
    for name, config_module in RUNS:
        reports = []
        for seed in map(int, _SEEDS.value):
            config = config_module.get_config()
            config.seed = seed
            config.progress = False
            if _STEPS.value:
                config.num_steps = _STEPS.value
            teacher_workdir = os.path.join(workdir, f"teacher_seed{seed}")
            if config.teacher.workdir:
                config.teacher.workdir = teacher_workdir
            if config.init_from:
                config.init_from = teacher_workdir
            report = train_and_evaluate(config, os.path.join(workdir, f"{name}_seed{seed}"))
            print(f"{name} seed {seed}: test accuracy {report['test_accuracy']:.4f}", flush=True)
            reports.append(report)
        rows.append(summarize(name, reports))
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump({"dataset": "digits", "runs": rows}, f, indent=2)
    plot_accuracy_vs_size(rows, os.path.join(workdir, "accuracy_vs_size.png"))
    print()
    print(format_table(rows))
    print(f"\nreport: {os.path.join(workdir, 'report.json')}")


if __name__ == "__main__":
    flags.FLAGS.set_default("verbosity", logging.WARNING)
    app.run(main)
