"""Figure 2: kdq against Qwix and AQT, the same model quantized at the same bits.

The MLP and the CNN of `kdq.models.small` at W8A8 and W4A4 (weights per
output channel, activations per tensor, dynamic ranges; `libraries` says how
each library is applied), trained with cross-entropy and Adam(1e-3) on
batches of 256 digits. Measured: the step time of kdq's `make_train_step` and
of the same plain jitted step (loss, gradient, Adam update, state donated)
around each library's quantized forward pass, against the float model's plain
step; and the digits test accuracy, with the same quantized forward pass,
after `--steps` steps from the same initial parameters over the same batches
(kdq's `train_batches`), for each seed. Goals: kdq's step / the peer's step
<= 1.0 at equal or better accuracy. A configuration a library cannot run is
reported with its error.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from experiments.bench import common, libraries
from experiments.bench.common import calls_per_sample, copy, goal, ms, ratio
from kdq.models import create_model

MODELS = ("mlp", "cnn")
BITS = (8, 4)
PEERS = ("qwix", "aqt")
KDQ = "kdq (make_train_step)"
KDQ_PLAIN = "kdq (plain step)"
AQT_CNN_NOTE = (
    "AQT's quantized conv has no gradient: its CNN step skips the conv backward pass "
    "and trains only the Dense layers"
)


class Setup(NamedTuple):
    """One way of training a model: `init(params)` -> state; `step(state, batch)` -> (new
    state, ...), jitted, the state donated; `logits(state, images)`, as in training.
    """

    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, ...]]
    logits: Callable[[Any, jax.Array], jax.Array]


def plain_setup(forward: libraries.Forward, tx: optax.GradientTransformation = common.TX) -> Setup:
    """The plain training step a user of any of the libraries writes around `forward`."""

    def step(state, batch):
        params, opt_state = state

        def loss_fn(p):
            logits = forward(p, batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return Setup(
        lambda params: (params, tx.init(params)),
        jax.jit(step, donate_argnums=0),
        jax.jit(lambda state, x: forward(state[0], x)),
    )


def runnable(name: str, bits: int, params, batch):
    """({label: setup}, {label: a call threading its state from `params`}, {label: error})
    of every way of training `name` at W<bits>A<bits> that is compared: a call for
    those whose first step compiles and runs, the first line of the others' errors.
    """
    model, recipe = create_model(name, num_classes=10), common.quant_recipe(bits)
    step, forward = common.train_step(model, recipe), libraries.forward("kdq", name, bits)
    kdq = Setup(
        lambda params: common.train_state(model, params, recipe),
        lambda state, batch: step(state, None, batch),
        jax.jit(lambda state, x: forward(state.params, x)),
    )
    found = {"float": plain_setup(libraries.forward("kdq", name, None)), KDQ: kdq}
    for label, library in ((KDQ_PLAIN, "kdq"), *((peer, peer) for peer in PEERS)):
        found[label] = plain_setup(libraries.forward(library, name, bits))
    calls, errors = {}, {}
    for label, setup in found.items():
        try:
            calls[label] = common.stepper(setup.step, setup.init(copy(params)), batch)
            jax.block_until_ready(calls[label]())
        except Exception as error:  # a library that cannot run a configuration is a result
            calls.pop(label, None)
            errors[label] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    return found, calls, errors


def accuracies(setup: Setup, inits: dict[int, Any], seed_batches, test) -> list[float]:
    """Per seed: the test accuracy after one step per batch of the seed from its params."""
    found = []
    for seed, params in inits.items():
        state = setup.init(copy(params))
        for batch in seed_batches[seed]:
            state = setup.step(state, batch)[0]
        predicted = np.asarray(setup.logits(state, test["image"]).argmax(-1))
        mask = np.asarray(test["mask"])
        found.append(int(np.sum((predicted == np.asarray(test["label"])) & mask)) / int(mask.sum()))
    return found


def comparison(name, config, peer, calls, accuracy, errors, seeds):
    """The row comparing kdq with `peer` on one model and config, and its goal checks."""
    row, where = {"model": name, "config": config, "peer": peer}, f"{name} {config}"
    if peer not in calls:
        return row | {"note": f"{peer} cannot run {config} here: {common.cell(errors[peer])}"}, []
    note = AQT_CNN_NOTE if (peer, name) == ("aqt", "cnn") else ""
    kdq_accuracy, peer_accuracy = statistics.fmean(accuracy[KDQ]), statistics.fmean(accuracy[peer])
    row |= {
        "kdq_step_over_peer": ratio(KDQ, peer),
        "kdq_plain_step_over_peer": ratio(KDQ_PLAIN, peer),
        "kdq_mean_accuracy": kdq_accuracy,
        "peer_mean_accuracy": peer_accuracy,
        "note": note,
    }
    goals = [
        goal(f"kdq make_train_step / {peer} step, {where}", ratio(KDQ, peer), 1.0, note=note),
        goal(f"kdq / {peer}, same plain step, {where}", ratio(KDQ_PLAIN, peer), 1.0, note=note),
        goal(
            f"kdq accuracy - {peer} accuracy, {where}",
            kdq_accuracy - peer_accuracy,
            0.0,
            at_most=False,
            note=f"mean over seeds {list(seeds)}",
        ),
    ]
    return row, goals


def figures(args):
    """Per model and bits: every runnable setup's step side by side, accuracies and goals."""
    batch, test, seeds = next(common.batches()), next(common.batches("test")), args.seeds
    seed_batches = {s: list(itertools.islice(common.batches(seed=s), args.steps)) for s in seeds}
    for name in MODELS:
        model = create_model(name, num_classes=10)
        params = common.init_params(model, batch)
        inits = {seed: common.init_params(model, batch, seed) for seed in seeds}
        float_accuracy = None  # the same at every bits
        for bits in BITS:
            config = f"W{bits}A{bits}"
            found, calls, errors = runnable(name, bits, params, batch)
            float_accuracy = float_accuracy or accuracies(found["float"], inits, seed_batches, test)
            accuracy = {"float": float_accuracy} | {
                label: accuracies(found[label], inits, seed_batches, test)
                for label in (KDQ, *PEERS)
                if label in calls
            }
            rows, goals = [], []
            for label in [*calls, *errors]:
                timed, values = label in calls, accuracy.get(label)
                rows.append(
                    {
                        "model": name,
                        "config": config,
                        "library": label.split(" ")[0],
                        "step": "make_train_step" if label == KDQ else "plain",
                        "step_ms": ms(label) if timed else None,
                        "ratio_to_float": ratio(label, "float")
                        if timed and label != "float"
                        else None,
                        "calls_per_sample": calls_per_sample(label) if timed else None,
                        "accuracy": values,
                        "mean_accuracy": statistics.fmean(values) if values else None,
                        "error": errors.get(label),
                    }
                )
            for peer in PEERS:
                row, checks = comparison(name, config, peer, calls, accuracy, errors, seeds)
                rows.append(row)
                goals += checks
            yield common.Figure(calls, rows, goals)


BENCHMARK = common.Benchmark(
    "peers",
    "kdq vs Qwix and AQT: QAT step time and accuracy on the same model and bits",
    figures,
    settings={
        "batch_size": common.BATCH_SIZE,
        "optimizer": common.OPTIMIZER,
        "recipes": common.recipes((f"W{b}A{b}", b) for b in BITS),
        "how_applied": libraries.__doc__,
    },
    tables={
        "Figure 2: {description} (batch {batch_size})": lambda row: "library" in row,
        "kdq against each peer; accuracy: mean over seeds {seeds} after {steps} steps, "
        "digits test set": lambda row: "peer" in row,
    },
    options=(*common.SAMPLING, "steps", "seeds"),
)

if __name__ == "__main__":
    BENCHMARK.main()
