"""Figure 1: the training-time cost of quantization-aware training.

Step time of kdq's jitted train step (`make_train_step`, cross-entropy, Adam,
state donated) on one digits batch of 256, for the float model and for W8A8
and W4A4 fake quantization (weights per output channel, activations per
tensor, dynamic ranges), on the MLP and the CNN of `kdq.models.small`.
Reported: step time and its ratio to the float step (goal: at most 1.3).
"""

from __future__ import annotations

from experiments.bench import common
from experiments.bench.common import calls_per_sample, goal, ms, ratio
from kdq.models import create_model

MODELS = ("mlp", "cnn")
CONFIGS = (("float", None), ("W8A8", 8), ("W4A4", 4))
LIMIT = 1.3


def figures(args):
    """One figure per model: its float, W8A8 and W4A4 train steps side by side."""
    batch = next(common.batches())
    for name in MODELS:
        model = create_model(name, num_classes=10)
        params = common.init_params(model, batch)
        calls, rows, goals = {}, [], []
        for label, bits in CONFIGS:
            calls[label] = common.train_call(model, params, common.quant_recipe(bits), batch)
            over_float = None if bits is None else ratio(label, "float")
            rows.append(
                {
                    "model": name,
                    "config": label,
                    "step_ms": ms(label),
                    "ratio_to_float": over_float,
                    "calls_per_sample": calls_per_sample(label),
                }
            )
            if bits is not None:
                goals.append(goal(f"QAT step / float step, {name} {label}", over_float, LIMIT))
        yield common.Figure(calls, rows, goals)


BENCHMARK = common.Benchmark(
    "qat_overhead",
    "QAT step time (W8A8, W4A4 fake quantization) against the float train step",
    figures,
    settings={
        "batch_size": common.BATCH_SIZE,
        "optimizer": common.OPTIMIZER,
        "models": {name: "kdq.models.create_model(name, num_classes=10)" for name in MODELS},
        "recipes": common.recipes(CONFIGS),
    },
    tables="Figure 1: {description} (batch {batch_size}, ms per step)",
)

if __name__ == "__main__":
    BENCHMARK.main()
