"""Figure 5: compile time of the KD + QAT train step.

    python -m experiments.bench.compile_time [--repeats N] [--out PATH]

The digits KD setup of `experiments/configs/digits_kd.py` (MLP student, CNN
teacher, 0.5 cross-entropy + 0.5 KD) with the student quantized at W8A8, and
for reference the float student's cross-entropy step and the float KD step,
batch 256. After one untimed warm-up compile, each repeat clears JAX's
caches, builds the step with `make_train_step` and times
`jit(...).lower(...)` (tracing and lowering to StableHLO) and `.compile()`
(XLA) separately. No goal is set; the figure is reported.
"""

from __future__ import annotations

import time

import jax
import optax

from experiments.bench import common
from experiments.bench.distill_overhead import kd_models, student_state
from kdq.distill.objective import Objective
from kdq.train import make_train_step
from kdq.train.step import FLOAT

NAME = "compile_time"
DESCRIPTION = "Compile time of the KD + QAT train step (trace + lower, XLA compile)"
CONFIGS = (
    ("student step, float", False, None),
    ("KD step, float", True, None),
    ("KD + QAT step, W8A8", True, 8),
)


def compile_once(student, teacher, objective, tx, recipe, state, teacher_variables, batch):
    """(seconds to trace and lower, seconds to compile) of a freshly built train step."""
    jax.clear_caches()
    step = make_train_step(
        student, objective, tx, teacher=teacher if objective.needs_teacher else None, recipe=recipe
    )
    start = time.perf_counter()
    lowered = step.lower(state, teacher_variables, batch)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def main(argv=None) -> dict:
    """Measures, prints the table and writes the JSON; returns the JSON document."""
    args = common.parser(__doc__, NAME, repeats=3, sampling=False).parse_args(argv)
    batch = common.first_batch(common.digits())
    tx = optax.adam(1e-3)
    student, teacher, kd_objective = kd_models()
    ce_objective = Objective.from_config({"ce": {"weight": 1.0}})
    student_params = student.init(jax.random.PRNGKey(0), batch["image"])["params"]
    teacher_variables = teacher.init(jax.random.PRNGKey(1), batch["image"])

    compile_once(
        student,
        teacher,
        ce_objective,
        tx,
        FLOAT,
        student_state(student, student_params, FLOAT, tx),
        None,
        batch,
    )
    rows, lines = [], []
    for label, distill, bits in CONFIGS:
        recipe = FLOAT if bits is None else common.quant_recipe(bits)
        objective = kd_objective if distill else ce_objective
        state = student_state(student, student_params, recipe, tx)
        variables = teacher_variables if distill else None
        times = [
            compile_once(student, teacher, objective, tx, recipe, state, variables, batch)
            for _ in range(args.repeats)
        ]
        lower = [t[0] for t in times]
        xla = [t[1] for t in times]
        row = {
            "step": label,
            "trace_and_lower_s": common.summary(lower),
            "compile_s": common.summary(xla),
            "total_s": common.summary([a + b for a, b in times]),
        }
        rows.append(row)
        lines.append(
            [
                label,
                common.fmt(row["trace_and_lower_s"]),
                common.fmt(row["compile_s"]),
                common.fmt(row["total_s"]),
            ]
        )
    print(f"\n== Figure 5: {DESCRIPTION} (seconds)")
    print(common.table(["step", "trace + lower", "XLA compile", "total"], lines))
    settings = {
        "repeats": args.repeats,
        "batch_size": common.BATCH_SIZE,
        "config": "experiments.configs.digits_kd",
    }
    document = common.report(NAME, DESCRIPTION, settings, rows, goals=[])
    common.write(document, args.out)
    return document


if __name__ == "__main__":
    main()
