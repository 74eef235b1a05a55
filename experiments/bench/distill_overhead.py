"""Figure 3: the training-time cost of distillation.

The digits KD setup of `experiments/configs/digits_kd.py` (MLP student with
one hidden layer of 32, CNN teacher with channels 32, 64 and dense 128, 0.5
cross-entropy + 0.5 standardised KD at T = 2), batch 256. Timed side by side:
the KD step (kdq's `make_train_step` with the teacher: one XLA program), the
same step with cross-entropy only, and the teacher's jitted forward
(`train=False`). Reported: KD step / (student step + teacher forward), per
round (goal: at most 1.1), for a float and a W8A8 QAT student.
"""

from __future__ import annotations

import jax

from experiments.bench import common
from experiments.bench.common import calls_per_sample, goal, ms, ratio
from experiments.configs import digits_kd
from kdq.distill.objective import Objective
from kdq.train.config import build_model

CONFIGS = (("float", None), ("W8A8", 8))
LIMIT = 1.1
SEPARATE = ("student", "teacher")


def kd_setup():
    """(student, its params, teacher, its variables, KD objective, batch) of digits KD."""
    config = digits_kd.get_config()
    student, teacher = build_model(config.model, 10), build_model(config.teacher, 10)
    batch = next(common.batches())
    params = common.init_params(student, batch)
    teacher_variables = teacher.init(jax.random.PRNGKey(1), batch["image"])
    objective = Objective.from_config(config.losses.to_dict())
    return student, params, teacher, teacher_variables, objective, batch


def figures(args):
    """One figure per student (float, W8A8): KD step, student step, teacher forward."""
    student, params, teacher, teacher_variables, objective, batch = kd_setup()
    teacher_forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False))
    for label, bits in CONFIGS:
        recipe = common.quant_recipe(bits)
        calls = {
            "kd": common.train_call(
                student, params, recipe, batch, objective, teacher, teacher_variables
            ),
            "student": common.train_call(student, params, recipe, batch),
            "teacher": lambda: teacher_forward(teacher_variables, batch["image"]),
        }
        row = {
            "student": label,
            "kd_step_ms": ms("kd"),
            "student_step_ms": ms("student"),
            "teacher_forward_ms": ms("teacher"),
            "student_plus_teacher_ms": ms(SEPARATE),
            "ratio": ratio("kd", SEPARATE),
            "calls_per_sample": calls_per_sample(tuple(calls)),
        }
        name = f"KD step / (student step + teacher forward), {label} student"
        yield common.Figure(calls, [row], [goal(name, ratio("kd", SEPARATE), LIMIT)])


BENCHMARK = common.Benchmark(
    "distill_overhead",
    "KD step time against student step + teacher forward measured separately",
    figures,
    settings={
        "batch_size": common.BATCH_SIZE,
        "optimizer": common.OPTIMIZER,
        "config": "experiments.configs.digits_kd",
        "recipes": common.recipes(CONFIGS),
    },
    tables="Figure 3: {description} (batch {batch_size}, ms)",
)

if __name__ == "__main__":
    BENCHMARK.main()
