"""Figure 3: the training-time cost of distillation.

    python -m experiments.bench.distill_overhead [--repeats N] [--out PATH]

The digits KD setup of `experiments/configs/digits_kd.py`: an MLP student
(one hidden layer of 32) distilled from the CNN teacher (channels 32, 64,
dense 128) with 0.5 cross-entropy + 0.5 standardised KD at T = 2, batch 256.
Three jitted calls are timed side by side:

* the KD step: kdq's `make_train_step` with the teacher (teacher forward,
  student forward and backward, Adam update, in one XLA program);
* the student step alone: the same step with cross-entropy only;
* the teacher forward alone: `teacher.apply(..., train=False)`.

Reported: KD step / (student step + teacher forward), per round (goal: at
most 1.1), for a float student and for a W8A8 QAT student.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from experiments.bench import common
from experiments.configs import digits_kd
from kdq.distill.objective import Objective
from kdq.quant import init_quant_params
from kdq.train import TrainState, make_train_step
from kdq.train.config import build_model
from kdq.train.step import FLOAT

NAME = "distill_overhead"
DESCRIPTION = "KD step time against student step + teacher forward measured separately"
CONFIGS = (("float", None), ("W8A8", 8))
LIMIT = 1.1


def kd_models():
    """(student, teacher, KD objective) of the digits KD config."""
    config = digits_kd.get_config()
    student = build_model(config.model, 10)
    teacher = build_model(config.teacher, 10)
    return student, teacher, Objective.from_config(config.losses.to_dict())


def student_state(student, params, recipe, tx):
    """A step-0 state for `student` holding a copy of `params`."""
    params = jax.tree_util.tree_map(jnp.copy, params)
    return TrainState.create(
        params=params,
        tx=tx,
        key=jax.random.PRNGKey(0),
        quant_params=init_quant_params(student, {"params": params}, recipe),
    )


def main(argv=None) -> dict:
    """Measures, prints the table and writes the JSON; returns the JSON document."""
    args = common.parser(__doc__, NAME).parse_args(argv)
    batch = common.first_batch(common.digits())
    tx = optax.adam(1e-3)
    student, teacher, kd_objective = kd_models()
    ce_objective = Objective.from_config({"ce": {"weight": 1.0}})
    student_params = student.init(jax.random.PRNGKey(0), batch["image"])["params"]
    teacher_variables = teacher.init(jax.random.PRNGKey(1), batch["image"])
    teacher_forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False))

    rows, goals, lines = [], [], []
    for label, bits in CONFIGS:
        recipe = FLOAT if bits is None else common.quant_recipe(bits)
        kd_step = make_train_step(student, kd_objective, tx, teacher=teacher, recipe=recipe)
        ce_step = make_train_step(student, ce_objective, tx, recipe=recipe)
        calls = {
            "kd": common.stepper(
                kd_step,
                student_state(student, student_params, recipe, tx),
                teacher_variables,
                batch,
            ),
            "student": common.stepper(
                ce_step, student_state(student, student_params, recipe, tx), None, batch
            ),
            "teacher": lambda: teacher_forward(teacher_variables, batch["image"]),
        }
        samples, numbers = common.time_interleaved(
            calls, repeats=args.repeats, warmup=args.warmup, min_sample_s=args.min_sample_s
        )
        separate = [s + t for s, t in zip(samples["student"], samples["teacher"], strict=True)]
        ratio = common.paired_ratio(samples["kd"], separate)
        row = {
            "student": label,
            "kd_step_ms": common.ms(samples["kd"]),
            "student_step_ms": common.ms(samples["student"]),
            "teacher_forward_ms": common.ms(samples["teacher"]),
            "student_plus_teacher_ms": common.ms(separate),
            "ratio": ratio,
            "calls_per_sample": numbers,
        }
        rows.append(row)
        lines.append(
            [
                label,
                common.fmt(row["kd_step_ms"]),
                common.fmt(row["student_step_ms"]),
                common.fmt(row["teacher_forward_ms"]),
                common.fmt(ratio),
            ]
        )
        goals.append(
            common.goal(
                f"KD step / (student step + teacher forward), {label} student",
                ratio["median"],
                LIMIT,
                at_most=True,
            )
        )
    print(f"\n== Figure 3: {DESCRIPTION} (batch {common.BATCH_SIZE}, ms)")
    print(
        common.table(
            ["student", "KD step", "student step", "teacher forward", "KD / (student + teacher)"],
            lines,
        )
    )
    print(common.goals_table(goals))
    settings = {
        **common.sampling_settings(args),
        "batch_size": common.BATCH_SIZE,
        "optimizer": "adam(1e-3)",
        "config": "experiments.configs.digits_kd",
        "recipes": {
            label: None if bits is None else common.quant_recipe(bits).to_json()
            for label, bits in CONFIGS
        },
    }
    document = common.report(NAME, DESCRIPTION, settings, rows, goals)
    common.write(document, args.out)
    return document


if __name__ == "__main__":
    main()
