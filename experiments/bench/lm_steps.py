"""Figure 6: the training-time cost of QAT and of distillation for the transformer LM.

The language models of `experiments/configs/shakespeare_lm_*.py`: the
`lm_tiny` teacher and the width-64 student, windows of 128 bytes of the
Shakespeare train plays, batch 32. Timed side by side, each a kdq
`make_train_step` (one XLA program) from the same state:

- the student's float step and its W4 (groups of 32) A8 per-token QAT step
  (shakespeare_lm_qat_w4a8_kd.py's recipe, cross-entropy only): goal QAT /
  float <= 1.3;
- the student's KD step (0.5 cross-entropy + 0.5 forward KL with the
  teacher inside the step), against the student's cross-entropy step plus
  the teacher's jitted forward measured separately: goal <= 1.1.
"""

from __future__ import annotations

import jax

from experiments.bench import common
from experiments.bench.common import calls_per_sample, goal, ms, ratio
from experiments.configs import shakespeare_lm_kd, shakespeare_lm_qat_w4a8_kd
from kdq.data import load_dataset, train_batches
from kdq.distill.objective import Objective
from kdq.quant import FLOAT
from kdq.tasks import LanguageModeling
from kdq.train import make_train_step
from kdq.train.config import build_model, quant_recipe

BATCH_SIZE = 32
QAT_LIMIT, KD_LIMIT = 1.3, 1.1
SEPARATE = ("student", "teacher")
TASK = LanguageModeling()
CE = Objective.from_config({"ce": {"weight": 1.0}})


def lm_batch(seq_len: int):
    """One training batch of `BATCH_SIZE` windows of `seq_len` bytes, on the device."""
    data = load_dataset("shakespeare_char", seq_len=seq_len)
    batches = train_batches(data, batch_size=BATCH_SIZE, seed=0, num_threads=0)
    return jax.device_put(next(batches))


def _step_call(model, params, recipe, batch, objective=CE, teacher=None, teacher_variables=None):
    step = make_train_step(model, objective, common.TX, task=TASK, teacher=teacher, recipe=recipe)
    state = common.train_state(model, params, recipe)
    return common.stepper(step, state, teacher_variables, batch)


def figures(args):
    """The QAT figure and the KD figure of the module docstring."""
    del args
    config = shakespeare_lm_kd.get_config()
    vocab = 256
    student, teacher = build_model(config.model, vocab), build_model(config.teacher, vocab)
    batch = lm_batch(config.seq_len)
    inputs = TASK.inputs(batch)
    params = student.init(jax.random.PRNGKey(0), inputs)["params"]
    teacher_variables = teacher.init(jax.random.PRNGKey(1), inputs)
    qat = quant_recipe(shakespeare_lm_qat_w4a8_kd.get_config())
    calls = {
        "float": _step_call(student, params, FLOAT, batch),
        "qat": _step_call(student, params, qat, batch),
    }
    row = {
        "float_step_ms": ms("float"),
        "qat_step_ms": ms("qat"),
        "ratio": ratio("qat", "float"),
        "calls_per_sample": calls_per_sample(tuple(calls)),
    }
    yield common.Figure(
        calls,
        [row],
        [goal("LM QAT step (W4 g32 A8) / float step", ratio("qat", "float"), QAT_LIMIT)],
    )
    objective = Objective.from_config(config.losses.to_dict())
    teacher_forward = jax.jit(lambda v, x: teacher.apply(v, x))
    calls = {
        "kd": _step_call(student, params, FLOAT, batch, objective, teacher, teacher_variables),
        "student": _step_call(student, params, FLOAT, batch),
        "teacher": lambda: teacher_forward(teacher_variables, inputs),
    }
    row = {
        "kd_step_ms": ms("kd"),
        "student_step_ms": ms("student"),
        "teacher_forward_ms": ms("teacher"),
        "ratio": ratio("kd", SEPARATE),
        "calls_per_sample": calls_per_sample(tuple(calls)),
    }
    name = "LM KD step / (student step + teacher forward)"
    yield common.Figure(calls, [row], [goal(name, ratio("kd", SEPARATE), KD_LIMIT)])


BENCHMARK = common.Benchmark(
    "lm_steps",
    "transformer LM train steps: QAT against float, KD against student + teacher",
    figures,
    settings={
        "batch_size": BATCH_SIZE,
        "optimizer": common.OPTIMIZER,
        "configs": "experiments.configs.shakespeare_lm_kd, shakespeare_lm_qat_w4a8_kd",
    },
    tables={
        "Figure 6a: LM QAT step against the float step (batch {batch_size}, ms)": lambda row: (
            "qat_step_ms" in row
        ),
        "Figure 6b: LM KD step against student step + teacher forward (batch {batch_size}, ms)": (
            lambda row: "kd_step_ms" in row
        ),
    },
)

if __name__ == "__main__":
    BENCHMARK.main()
