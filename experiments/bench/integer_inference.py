"""Figure 4: inference latency of kdq's integer path against float32.

The MLP and the CNN of `kdq.models.small` quantized post-training to W8A8
(`kdq.quant.ptq`: weights per output channel, activations per tensor) and run
by `kdq.quant.integer_apply` (int8 operands, int32 accumulation), against the
jitted float32 `model.apply`, at batch 1, 32 and 256 of digits images; with
"static" activation scales (calibrated on 4 training batches: deployment) and
"dynamic" ones (measured at run time). Reported: latency per call, speedup =
float / integer (goal: at least 1.3 at batch 256).
"""

from __future__ import annotations

import functools
import itertools

import jax

from experiments.bench import common
from experiments.bench.common import calls_per_sample, goal, ms, ratio
from kdq.models import create_model
from kdq.quant import integer_apply, ptq

MODELS = ("mlp", "cnn")
BATCHES = (1, 32, 256)
MODES = ("static", "dynamic")
CALIBRATION_BATCHES = 4
LIMIT = 1.3


def figures(args):
    """One figure per model: float32 and both integer modes at every batch size."""
    images = next(common.batches())["image"]
    calibration = [
        b["image"] for b in itertools.islice(common.batches(seed=1), CALIBRATION_BATCHES)
    ]
    for name in MODELS:
        model = create_model(name, num_classes=10)
        variables = model.init(jax.random.PRNGKey(0), images)
        recipes = {mode: common.quant_recipe(8, mode) for mode in MODES}
        quantized = {mode: ptq(model, variables, calibration, r) for mode, r in recipes.items()}
        float_apply = jax.jit(lambda v, x, model=model: model.apply(v, x))
        int_apply = jax.jit(lambda q, x, model=model: integer_apply(model, q, x))
        calls, rows, goals = {}, [], []
        for batch in BATCHES:
            x, names = images[:batch], {c: f"{c}/{batch}" for c in ("float", *MODES)}
            calls[names["float"]] = functools.partial(float_apply, variables, x)
            row = {"model": name, "batch": batch, "float_ms": ms(names["float"])}
            for mode in MODES:
                calls[names[mode]] = functools.partial(int_apply, quantized[mode], x)
                speedup = ratio(names["float"], names[mode])
                row |= {f"integer_{mode}_ms": ms(names[mode]), f"speedup_{mode}": speedup}
                if batch == max(BATCHES):
                    text = f"integer ({mode}) speedup over float32, {name} batch {batch}"
                    goals.append(goal(text, speedup, LIMIT, at_most=False))
            rows.append(row | {"calls_per_sample": calls_per_sample(list(names.values()))})
        yield common.Figure(calls, rows, goals)


BENCHMARK = common.Benchmark(
    "integer_inference",
    "float32 vs kdq integer (W8A8) inference latency",
    figures,
    settings={
        "batches": BATCHES,
        "calibration_batches": CALIBRATION_BATCHES,
        "recipes": {mode: common.quant_recipe(8, mode).to_json() for mode in MODES},
    },
    tables="Figure 4: {description} (ms per call)",
)

if __name__ == "__main__":
    BENCHMARK.main()
