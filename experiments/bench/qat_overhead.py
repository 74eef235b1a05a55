"""Figure 1: the training-time cost of quantization-aware training.

    python -m experiments.bench.qat_overhead [--repeats N] [--out PATH]

Step time of kdq's jitted train step (`make_train_step`, cross-entropy, Adam,
state donated) on one digits batch of 256, for the float model and for W8A8
and W4A4 fake quantization (weights per output channel, activations per
tensor, dynamic ranges), on the MLP and the CNN of `kdq.models.small`.
Reported: step time and its ratio to the float step (goal: at most 1.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from experiments.bench import common
from kdq.distill.objective import Objective
from kdq.models import create_model
from kdq.quant import init_quant_params
from kdq.train import TrainState, make_train_step
from kdq.train.step import FLOAT

NAME = "qat_overhead"
DESCRIPTION = "QAT step time (W8A8, W4A4 fake quantization) against the float train step"
MODELS = ("mlp", "cnn")
CONFIGS = (("float", None), ("W8A8", 8), ("W4A4", 4))
LIMIT = 1.3


def train_call(model, params, batch, recipe, objective, tx):
    """A call of kdq's train step for `recipe` on a fresh state holding a copy of `params`."""
    params = jax.tree_util.tree_map(jnp.copy, params)
    state = TrainState.create(
        params=params,
        tx=tx,
        key=jax.random.PRNGKey(0),
        quant_params=init_quant_params(model, {"params": params}, recipe),
    )
    step = make_train_step(model, objective, tx, recipe=recipe)
    return common.stepper(step, state, None, batch)


def main(argv=None) -> dict:
    """Measures, prints the table and writes the JSON; returns the JSON document."""
    args = common.parser(__doc__, NAME).parse_args(argv)
    batch = common.first_batch(common.digits())
    tx = optax.adam(1e-3)
    objective = Objective.from_config({"ce": {"weight": 1.0}})
    rows, goals, lines = [], [], []
    for name in MODELS:
        model = create_model(name, num_classes=10)
        params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
        calls = {
            label: train_call(
                model,
                params,
                batch,
                FLOAT if bits is None else common.quant_recipe(bits),
                objective,
                tx,
            )
            for label, bits in CONFIGS
        }
        samples, numbers = common.time_interleaved(
            calls, repeats=args.repeats, warmup=args.warmup, min_sample_s=args.min_sample_s
        )
        for label, bits in CONFIGS:
            ratio = None if bits is None else common.paired_ratio(samples[label], samples["float"])
            rows.append(
                {
                    "model": name,
                    "config": label,
                    "step_ms": common.ms(samples[label]),
                    "ratio_to_float": ratio,
                    "calls_per_sample": numbers[label],
                }
            )
            lines.append([name, label, common.fmt(rows[-1]["step_ms"]), common.fmt(ratio)])
            if ratio is not None:
                goals.append(
                    common.goal(
                        f"QAT step / float step, {name} {label}",
                        ratio["median"],
                        LIMIT,
                        at_most=True,
                    )
                )
    print(f"\n== Figure 1: {DESCRIPTION} (batch {common.BATCH_SIZE}, ms per step)")
    print(common.table(["model", "config", "step ms", "x float"], lines))
    print(common.goals_table(goals))
    settings = {
        **common.sampling_settings(args),
        "batch_size": common.BATCH_SIZE,
        "optimizer": "adam(1e-3)",
        "models": {name: "kdq.models.create_model(name, num_classes=10)" for name in MODELS},
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
