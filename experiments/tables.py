"""The demo's tables: which configurations run, and how one table's runs are made.

`IMAGE_RUNS` (the embedded digits) and `LM_RUNS` (Shakespeare language
models) list (row name, config module), the table's teacher first;
`run_table` trains (or quantizes) each with every seed and summarises the
seeds of a row. Used by `experiments.demo` and `experiments.lm_full`.
"""

from __future__ import annotations

import logging
import os

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
    shakespeare_lm_gkd,
    shakespeare_lm_kd,
    shakespeare_lm_prune_2of4_kd,
    shakespeare_lm_qat_w4a8_kd,
    shakespeare_lm_student,
    shakespeare_lm_teacher,
)
from kdq.report import summarize
from kdq.train import quantize_and_evaluate, train_and_evaluate

IMAGE_RUNS = [
    ("teacher", digits_teacher),
    ("student", digits_student),
    ("student_kd", digits_kd),
    ("student_w4_kd", digits_qat_kd),
    ("ptq_w8a8", digits_ptq_w8a8),
    ("qat_w4a4_kd", digits_qat_w4a4_kd),
    ("qat_w2a2_kd", digits_qat_w2a2_kd),
    ("pruned_2of4_w4_kd", digits_prune_2of4_w4_kd),
]
LM_RUNS = [
    ("lm_teacher", shakespeare_lm_teacher),
    ("lm_student", shakespeare_lm_student),
    ("lm_kd", shakespeare_lm_kd),
    ("lm_gkd", shakespeare_lm_gkd),
    ("lm_qat_w4a8_kd", shakespeare_lm_qat_w4a8_kd),
    ("lm_prune_2of4_kd", shakespeare_lm_prune_2of4_kd),
]
# The entry point of each config's `entry_point`: PTQ rows are quantized, not trained.
ENTRY_POINTS = {"train": train_and_evaluate, "ptq": quantize_and_evaluate}


def quiet_library_logs() -> None:
    """Keeps library INFO logs (orbax writes several per checkpoint, through absl) off the terminal."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "jax", "tensorstore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_table(
    runs, seeds: list[int], workdir: str, configs: dict, *, num_steps: int | None = None
) -> list[dict]:
    """Runs every configuration of one table with each seed; returns its summary rows.

    The first configuration is the table's teacher: a run of seed s distils
    from (or quantizes) the teacher run of seed s. `num_steps` overrides every
    run's steps (warm-up capped at half of them); `configs` gets each row's
    config file and steps.
    """
    teacher_name, rows = runs[0][0], []
    for name, config_module in runs:
        reports = []
        for seed in seeds:
            config = config_module.get_config()
            config.seed = seed
            config.progress = True
            if num_steps:
                config.num_steps = num_steps
                config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, num_steps // 2)
            teacher_workdir = os.path.join(workdir, f"{teacher_name}_seed{seed}")
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
    return rows
