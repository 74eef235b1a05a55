"""Figure 8: post-training quantization of a transformer LM, kdq against Qwix.

The model is the byte-level `lm_tiny` of
`experiments/configs/shakespeare_lm_ptq_teacher.py` (0.82 M parameters,
1,200 steps of batch 32 on the train plays, seed 0: test 2.125 bits per
byte; 9.6 minutes on 2 CPU cores), trained once into runs/bench/lm_teacher
and reused from there (a changed teacher config is refused there by
`kdq.train.train_and_evaluate`: delete the directory to retrain).
Quantized: the seven Dense kernels of each of its four blocks (q, k, v, o,
gate, up, down; the tied embedding stays float). Calibration: the same
`CALIBRATION_BATCHES` batches of 32 train windows of 128 bytes for every
method of both libraries. Quality: bits per byte of the quantized model on
every byte of the test plays (`kdq.tasks.LanguageModeling`); time: wall
seconds of the calibration, compilation included (a cold run of each, one
method after the other in this process, kdq's methods before Qwix's for
each recipe).

Recipes: weight-only W4 g128, W4 g32 and W3 g128 (symmetric, one scale per
output channel and group of consecutive input rows), and W8A8 (per-channel
8-bit weights, per-token dynamic 8-bit inputs). kdq's methods run through
`kdq.quant.layerwise_ptq` (each block's attention and MLP calibrated on the
outputs of the already quantized stages before it; GPTQ with activation
order, and in natural column order as "gptq-no-act-order"); Qwix's through
`experiments.bench.ptq_qwix.qwix_ptq` (statistics from the float model;
GPTQ in natural column order, int4/int8 only, so it has no W3 g128 GPTQ
row). Each Qwix row is compared with the kdq method of `KDQ_COUNTERPART`
(GPTQ: kdq's in natural column order). The KV-cache rows score the float model through an int8 and
an int4 cache (`kdq.kv_quant.cached_lm_loss`). `peak_rss_mib` is the
process's peak resident memory so far when the row finished.

Goals: GPTQ closes >= 50 % of RTN's gap to float at W4 g128 and W3 g128;
AWQ no worse than RTN at W4 g128; SmoothQuant W8A8 <= +1 % relative to
float and no worse than naive (round-to-nearest) W8A8;
kdq's bits per byte <= Qwix's and its calibration time <= 1.0x Qwix's for
each method and recipe both run; kdq's GPTQ W4 g128 calibration <= 120 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from experiments.bench import common
from experiments.bench.common import goal
from experiments.bench.ptq_qwix import qwix_ptq
from experiments.configs import shakespeare_lm_ptq_teacher
from kdq import checkpoint
from kdq.data import eval_batches, train_batches
from kdq.kv_quant import cached_lm_loss
from kdq.quant import (
    PTQMethod,
    QuantRecipe,
    QuantSpec,
    fake_quant_apply,
    layerwise_ptq,
    ptq,
)
from kdq.tasks import LanguageModeling, Targets
from kdq.train import build, train_and_evaluate
from kdq.train.workdir import config_json, previous_config

CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE, CALIBRATION_SEED = 4, 32, 1
EVAL_BATCH_SIZE = 256
KERNELS, LAYERS = r"block_\d+/.*/kernel", r"block_\d+/.*"
WEIGHT_ONLY = {"W4 g128": (4, 128), "W4 g32": (4, 32), "W3 g128": (3, 128)}
KDQ_WEIGHT_ONLY = {
    "rtn": PTQMethod(),
    "gptq": PTQMethod(weights="gptq"),
    "awq": PTQMethod(scaling="awq"),
    "rotate+rtn": PTQMethod(rotate=True),
    "rotate+gptq": PTQMethod(weights="gptq", rotate=True),
    "gptq-no-act-order": PTQMethod(weights="gptq", gptq_act_order=False),
}
KDQ_W8A8 = {
    "rtn": PTQMethod(),
    "smoothquant": PTQMethod(scaling="smoothquant"),
    "rotate+rtn": PTQMethod(rotate=True),
}
QWIX_WEIGHT_ONLY, QWIX_W8A8 = ("rtn", "gptq", "awq"), ("rtn", "smoothquant")
# The kdq method each Qwix method is compared with: GPTQ in Qwix's column order.
KDQ_COUNTERPART = {
    "rtn": "rtn",
    "gptq": "gptq-no-act-order",
    "awq": "awq",
    "smoothquant": "smoothquant",
}
TEACHER_DIR = os.path.join("runs", "bench", "lm_teacher")
TASK = LanguageModeling()
GPTQ_LIMIT_S = 120.0


def teacher(workdir: str) -> tuple[Any, Any, Any]:
    """(model, variables, dataset) of the teacher, trained into `workdir` unless it is there."""
    config = shakespeare_lm_ptq_teacher.get_config()
    finished = os.path.exists(os.path.join(workdir, "report.json"))
    if not (finished and previous_config(os.path.abspath(workdir)) == config_json(config)):
        train_and_evaluate(config, workdir)
    setup = build(config, None)
    example = np.zeros((1, config.seq_len), np.int32)
    template = setup.student.init(jax.random.PRNGKey(0), example)
    variables = checkpoint.load_float_variables(workdir, template)
    return setup.student, variables, setup.dataset


def calibration_inputs(dataset) -> list[jax.Array]:
    """`CALIBRATION_BATCHES` seeded batches of train windows, as model inputs (B, T)."""
    batches = train_batches(
        dataset, batch_size=CALIBRATION_BATCH_SIZE, seed=CALIBRATION_SEED, num_threads=0
    )
    return [jax.device_put(TASK.inputs(next(batches))) for _ in range(CALIBRATION_BATCHES)]


def test_windows(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Every test window: tokens (N, T + 1) and the mask of the targets that count (N, T)."""
    tokens, where = [], []
    for batch in eval_batches(dataset, batch_size=EVAL_BATCH_SIZE, split="test", num_threads=0):
        tokens.append(np.asarray(batch["tokens"]))
        where.append(np.asarray(batch["token_mask"] & batch["mask"][:, None]))
    return np.concatenate(tokens), np.concatenate(where)


_SUMS = jax.jit(lambda logits, labels, where: TASK.eval_sums(logits, Targets(labels, where)))


def bits_per_byte(logits_of: Callable[[jax.Array], jax.Array], windows) -> float:
    """Test bits per byte of `logits_of(inputs (B, T)) -> (B, T, 256)` over `windows`."""
    tokens, where = windows
    totals: dict[str, float] = {}
    for start in range(0, len(tokens), EVAL_BATCH_SIZE):
        chunk = tokens[start : start + EVAL_BATCH_SIZE]
        logits = logits_of(jax.device_put(chunk[:, :-1]))
        sums = _SUMS(logits, chunk[:, 1:], where[start : start + EVAL_BATCH_SIZE])
        for name, value in jax.device_get(sums).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return TASK.summarize(totals)["bits_per_byte"]


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kdq_recipe(weight_bits: int, group_size: int | None, act_bits: int | None) -> QuantRecipe:
    """The block kernels at `weight_bits` (per channel, or per group), inputs per token."""
    spec = QuantSpec(bits=weight_bits, axes=(-1,), group_size=group_size)
    if act_bits is None:
        return QuantRecipe(weight_rules=((KERNELS, spec),))
    return QuantRecipe(
        weight_rules=((KERNELS, spec),),
        act_rules=((LAYERS, QuantSpec(bits=act_bits, axes=(0, 1))),),
        act_mode="dynamic",
    )


def cases() -> Iterator[tuple[str, str, int, int | None, int | None]]:
    """(library, method, weight_bits, group_size, act_bits) of every quantized row, in order."""
    for bits, group_size in WEIGHT_ONLY.values():
        for method in KDQ_WEIGHT_ONLY:
            yield "kdq", method, bits, group_size, None
        for method in QWIX_WEIGHT_ONLY:
            if not (method == "gptq" and bits == 3):
                yield "qwix", method, bits, group_size, None
    for method in KDQ_W8A8:
        yield "kdq", method, 8, None, 8
    for method in QWIX_W8A8:
        yield "qwix", method, 8, None, 8


def kdq_quantize(model, variables, calibration, method, recipe) -> tuple[Callable, float, dict]:
    """(logits of inputs, calibration seconds, extra fields) of kdq's `method`.

    "rtn" is `kdq.quant.ptq` without a method (no statistics are needed);
    every other method runs `layerwise_ptq`.
    """
    methods = KDQ_W8A8 if recipe.quantizes_activations else KDQ_WEIGHT_ONLY
    start = time.perf_counter()
    if method == "rtn":
        qmodel = ptq(model, variables, calibration, recipe)
    else:
        qmodel, _ = layerwise_ptq(
            model, variables, calibration, recipe, methods[method], progress=False
        )
    jax.block_until_ready(qmodel.params)
    calibration_s = time.perf_counter() - start
    forward = jax.jit(lambda q, x: fake_quant_apply(model, q, x))
    return (lambda x: forward(qmodel, x)), calibration_s, {}


def qwix_quantize(model, variables, calibration, method, weight_bits, group_size, act_bits):
    """(logits of inputs, calibration seconds, extra fields) of Qwix's `method`."""
    result = qwix_ptq(
        model,
        variables,
        calibration,
        method=method,
        weight_bits=weight_bits,
        group_size=group_size,
        act_bits=act_bits,
    )
    extra = {"statistics_s": result.statistics_s, "quantize_compile_s": result.quantize_compile_s}
    return result.apply, result.calibration_s, extra


def quantized_row(model, variables, calibration, windows, case) -> dict[str, Any]:
    """Quantizes by `case` (see `cases`), then measures the row's bits per byte."""
    library, method, weight_bits, group_size, act_bits = case
    if library == "kdq":
        recipe = kdq_recipe(weight_bits, group_size, act_bits)
        logits_of, seconds, extra = kdq_quantize(model, variables, calibration, method, recipe)
    else:
        logits_of, seconds, extra = qwix_quantize(
            model, variables, calibration, method, weight_bits, group_size, act_bits
        )
    row = {
        "library": library,
        "method": method,
        "weight_bits": weight_bits,
        "group_size": group_size,
        "act_bits": act_bits,
        "kv_cache_bits": None,
        "test_bits_per_byte": bits_per_byte(logits_of, windows),
        "calibration_s": seconds,
        **extra,
    }
    return row | {"peak_rss_mib": peak_rss_mib()}


def float_rows(model, variables, windows) -> list[dict[str, Any]]:
    """The float model, and the float model read through an int8 and an int4 KV cache."""
    forward = jax.jit(model.apply)
    base = dict(library="kdq", weight_bits=None, group_size=None, act_bits=None)
    rows = [
        {
            **base,
            "method": "float",
            "kv_cache_bits": None,
            "test_bits_per_byte": bits_per_byte(lambda x: forward(variables, x), windows),
        }
    ]
    tokens, where = windows
    for bits in (8, 4):
        loss = cached_lm_loss(model, variables, tokens, where, kv_cache_bits=bits, batch_size=64)
        rows.append(
            {
                **base,
                "method": "float",
                "kv_cache_bits": bits,
                "test_bits_per_byte": loss["bits_per_byte"],
            }
        )
    for row in rows:
        row.update(calibration_s=0.0, peak_rss_mib=peak_rss_mib())
    return rows


def _find(rows, library, method, weight_bits, group_size, act_bits=None) -> dict[str, Any] | None:
    """The row of these fields with a float KV cache, or None."""
    for row in rows:
        key = (row["library"], row["method"], row["weight_bits"], row["group_size"])
        other = (row["act_bits"], row["kv_cache_bits"])
        if key == (library, method, weight_bits, group_size) and other == (act_bits, None):
            return row
    return None


def gap_closed(rows, label: str, method: str = "gptq") -> float:
    """(rtn - method) / (rtn - float) of kdq's test bits per byte at a weight-only recipe."""
    bits, group_size = WEIGHT_ONLY[label]
    reference = _find(rows, "kdq", "float", None, None)["test_bits_per_byte"]
    rtn = _find(rows, "kdq", "rtn", bits, group_size)["test_bits_per_byte"]
    other = _find(rows, "kdq", method, bits, group_size)["test_bits_per_byte"]
    return (rtn - other) / (rtn - reference)


def goals(rows) -> list[dict[str, Any]]:
    """The module docstring's goals, from the measured rows."""
    reference = _find(rows, "kdq", "float", None, None)["test_bits_per_byte"]
    checks = [
        goal(
            f"kdq GPTQ closes RTN's gap to float, {label}",
            gap_closed(rows, label),
            0.5,
            at_most=False,
        )
        for label in ("W4 g128", "W3 g128")
    ]
    awq, rtn = (_find(rows, "kdq", m, 4, 128)["test_bits_per_byte"] for m in ("awq", "rtn"))
    checks.append(goal("kdq AWQ - RTN bits/byte, W4 g128", awq - rtn, 0.0))
    smooth, naive = (
        _find(rows, "kdq", m, 8, None, 8)["test_bits_per_byte"] for m in ("smoothquant", "rtn")
    )
    checks.append(
        goal(
            "kdq SmoothQuant W8A8 / float - 1",
            smooth / reference - 1,
            0.01,
            note=f"naive W8A8: {naive / reference - 1:+.4f}",
        )
    )
    checks.append(goal("kdq SmoothQuant - naive W8A8 bits/byte", smooth - naive, 0.0))
    for row in rows:
        if row["library"] != "qwix":
            continue
        mine = _find(
            rows,
            "kdq",
            KDQ_COUNTERPART[row["method"]],
            row["weight_bits"],
            row["group_size"],
            row["act_bits"],
        )
        recipe = f"{row['method']} W{row['weight_bits']}" + (
            f" g{row['group_size']}" if row["group_size"] else f"A{row['act_bits']}"
        )
        checks.append(
            goal(
                f"kdq - Qwix bits/byte, {recipe}",
                mine["test_bits_per_byte"] - row["test_bits_per_byte"],
                0.0,
            )
        )
        checks.append(
            goal(
                f"kdq / Qwix calibration time, {recipe}",
                mine["calibration_s"] / row["calibration_s"],
                1.0,
            )
        )
    gptq = _find(rows, "kdq", "gptq", 4, 128)
    checks.append(
        goal(
            "kdq GPTQ W4 g128 calibration (s)",
            gptq["calibration_s"],
            GPTQ_LIMIT_S,
            note=f"peak RSS so far {gptq['peak_rss_mib']:.0f} MiB",
        )
    )
    return checks


def figures(args: argparse.Namespace) -> Iterator[common.Figure]:
    """One figure: every row of the module docstring, and its goals."""
    del args
    model, variables, dataset = teacher(TEACHER_DIR)
    calibration, windows = calibration_inputs(dataset), test_windows(dataset)
    rows = float_rows(model, variables, windows)
    for row in rows:
        print(json.dumps(row), flush=True)
    for case in cases():
        rows.append(quantized_row(model, variables, calibration, windows, case))
        print(json.dumps(rows[-1]), flush=True)
    yield common.Figure(rows=rows, goals=goals(rows))


def recipe_label(row: dict[str, Any]) -> str:
    """ "float", "KV8" (the float model through an int8 cache), "W4 g128", "W8A8", ..."""
    if row["kv_cache_bits"]:
        return f"KV{row['kv_cache_bits']}"
    if row["weight_bits"] is None:
        return "float"
    if row["act_bits"]:
        return f"W{row['weight_bits']}A{row['act_bits']}"
    group = f" g{row['group_size']}" if row["group_size"] else ""
    return f"W{row['weight_bits']}{group}"


def format_table(document: dict[str, Any]) -> str:
    """The README table of a benchmark document: one line per row, in its order."""
    rows = document["figures"]
    reference = _find(rows, "kdq", "float", None, None)["test_bits_per_byte"]
    lines = [
        f"{'recipe':<9}{'library':<8}{'method':<19}{'test bpb':>9}{'vs float':>10}{'calib s':>9}"
    ]
    for row in rows:
        bpb = row["test_bits_per_byte"]
        lines.append(
            f"{recipe_label(row):<9}{row['library']:<8}{row['method']:<19}{bpb:>9.4f}"
            f"{bpb - reference:>+10.4f}{row['calibration_s']:>9.1f}"
        )
    return "\n".join(lines)


BENCHMARK = common.Benchmark(
    "ptq_transformers",
    "post-training quantization of the lm_tiny byte LM: kdq and Qwix on the same calibration",
    figures,
    settings={
        "teacher_config": "experiments.configs.shakespeare_lm_ptq_teacher",
        "calibration": f"{CALIBRATION_BATCHES} train batches of {CALIBRATION_BATCH_SIZE} "
        f"windows of 128 bytes, seed {CALIBRATION_SEED}",
        "evaluation": "every byte of the test plays",
    },
    tables="Figure 8: PTQ of the byte LM, test bits per byte and calibration seconds",
    options=(),
)

if __name__ == "__main__":
    BENCHMARK.main()
