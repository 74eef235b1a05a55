"""Figure 5: compile time of the KD + QAT train step.

The digits KD setup of `distill_overhead` with the student at W8A8 and, for
reference, the float KD step and the float student's cross-entropy step.
After one untimed compile, each repeat clears JAX's caches, builds the step
(`make_train_step`) and times `.lower(...)` (tracing and lowering to
StableHLO) and `.compile()` (XLA) separately. No goal; the figure is reported.
"""

from __future__ import annotations

import time

import jax

from experiments.bench import common
from experiments.bench.distill_overhead import kd_setup

CONFIGS = (
    ("student step, float", False, None),
    ("KD step, float", True, None),
    ("KD + QAT step, W8A8", True, 8),
)


def compile_once(build, *args):
    """(seconds to trace and lower, to compile) `common.train_step(*build)` on `args`."""
    jax.clear_caches()
    step = common.train_step(*build)
    start = time.perf_counter()
    lowered = step.lower(*args)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def figures(args):
    """One figure per step: `repeats` (lower, compile) seconds, after one warm-up compile."""
    student, params, teacher, teacher_variables, kd_objective, batch = kd_setup()
    for index, (label, distill, bits) in enumerate(CONFIGS):
        recipe = common.quant_recipe(bits)
        build = (student, recipe, *((kd_objective, teacher) if distill else ()))
        state = common.train_state(student, params, recipe)
        inputs = (build, state, teacher_variables if distill else None, batch)
        if index == 0:  # one untimed compile first
            compile_once(*inputs)
        times = [compile_once(*inputs) for _ in range(args.repeats)]
        row = {
            "step": label,
            "trace_and_lower_s": common.summary([lower for lower, _ in times]),
            "compile_s": common.summary([xla for _, xla in times]),
            "total_s": common.summary([sum(pair) for pair in times]),
        }
        yield common.Figure(rows=[row])


BENCHMARK = common.Benchmark(
    "compile_time",
    "Compile time of the KD + QAT train step (trace + lower, XLA compile)",
    figures,
    settings={"batch_size": common.BATCH_SIZE, "config": "experiments.configs.digits_kd"},
    tables="Figure 5: {description} (seconds)",
    repeats=3,
    options=("repeats",),
)

if __name__ == "__main__":
    BENCHMARK.main()
