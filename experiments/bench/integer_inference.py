"""Figure 4: inference latency of kdq's integer path against float32.

    python -m experiments.bench.integer_inference [--repeats N] [--out PATH]

The MLP and the CNN of `kdq.models.small`, quantized post-training to W8A8
(`kdq.quant.ptq`: weights per output channel, activations per tensor) and run
by `kdq.quant.integer_apply` (int8 operands, int32 accumulation), against the
jitted float32 `model.apply`, at batch 1, 32 and 256 of digits images. Two
activation modes: "static" (scales calibrated on 4 training batches, the
deployment path) and "dynamic" (each input's range measured at run time).
Reported: latency per call and speedup = float / integer (goal: at least 1.3
at batch 256).
"""

from __future__ import annotations

import functools
import itertools

import jax

from experiments.bench import common
from kdq.models import create_model
from kdq.quant import QuantRecipe, integer_apply, ptq

NAME = "integer_inference"
DESCRIPTION = "float32 vs kdq integer (W8A8) inference latency"
MODELS = ("mlp", "cnn")
BATCHES = (1, 32, 256)
MODES = ("static", "dynamic")
CALIBRATION_BATCHES = 4
LIMIT = 1.3


def recipe(mode: str) -> QuantRecipe:
    """W8A8 with `mode` activation ranges."""
    base = common.quant_recipe(8)
    return QuantRecipe(weight_rules=base.weight_rules, act_rules=base.act_rules, act_mode=mode)


def main(argv=None) -> dict:
    """Measures, prints the table and writes the JSON; returns the JSON document."""
    args = common.parser(__doc__, NAME).parse_args(argv)
    data = common.digits()
    images = common.first_batch(data)["image"]
    calibration = [
        b["image"] for b in itertools.islice(common.train_stream(data, seed=1), CALIBRATION_BATCHES)
    ]
    rows, goals, lines = [], [], []
    for name in MODELS:
        model = create_model(name, num_classes=10)
        variables = model.init(jax.random.PRNGKey(0), images)
        quantized = {mode: ptq(model, variables, calibration, recipe(mode)) for mode in MODES}
        float_apply = jax.jit(lambda v, x, model=model: model.apply(v, x))
        int_apply = jax.jit(lambda q, x, model=model: integer_apply(model, q, x))
        calls = {}
        for batch in BATCHES:
            x = images[:batch]
            calls[f"float/{batch}"] = functools.partial(float_apply, variables, x)
            for mode in MODES:
                calls[f"{mode}/{batch}"] = functools.partial(int_apply, quantized[mode], x)
        samples, numbers = common.time_interleaved(
            calls, repeats=args.repeats, warmup=args.warmup, min_sample_s=args.min_sample_s
        )
        for batch in BATCHES:
            reference = samples[f"float/{batch}"]
            row = {"model": name, "batch": batch, "float_ms": common.ms(reference)}
            line = [name, batch, common.fmt(row["float_ms"], 4)]
            for mode in MODES:
                key = f"{mode}/{batch}"
                speedup = common.paired_ratio(reference, samples[key])
                row[f"integer_{mode}_ms"] = common.ms(samples[key])
                row[f"speedup_{mode}"] = speedup
                line += [common.fmt(row[f"integer_{mode}_ms"], 4), common.fmt(speedup, 2)]
                if batch == max(BATCHES):
                    goals.append(
                        common.goal(
                            f"integer ({mode}) speedup over float32, {name} batch {batch}",
                            speedup["median"],
                            LIMIT,
                            at_most=False,
                        )
                    )
            row["calls_per_sample"] = {k: v for k, v in numbers.items() if k.endswith(f"/{batch}")}
            rows.append(row)
            lines.append(line)
    print(f"\n== Figure 4: {DESCRIPTION} (ms per call)")
    headers = ["model", "batch", "float32"]
    for mode in MODES:
        headers += [f"int {mode}", f"speedup {mode}"]
    print(common.table(headers, lines))
    print(common.goals_table(goals))
    settings = {
        **common.sampling_settings(args),
        "batches": BATCHES,
        "calibration_batches": CALIBRATION_BATCHES,
        "recipes": {mode: recipe(mode).to_json() for mode in MODES},
    }
    document = common.report(NAME, DESCRIPTION, settings, rows, goals)
    common.write(document, args.out)
    return document


if __name__ == "__main__":
    main()
