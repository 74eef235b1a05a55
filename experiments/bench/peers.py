"""Figure 2: kdq against Qwix and AQT, the same model quantized at the same bits.

    python -m experiments.bench.peers [--repeats N] [--steps 300] [--seeds 0 1 2] [--out PATH]

The MLP and the CNN of `kdq.models.small` at W8A8 and W4A4 (weights per
output channel, activations per tensor, dynamic ranges; see
`experiments.bench.libraries` for how each library is applied), trained with
cross-entropy and Adam(1e-3) on batches of 256 digits:

* step time: kdq's own train step (`make_train_step`) and, for a like-for-like
  view, the same plain jitted step (loss, gradient, Adam update, params and
  optimizer state donated) around each library's quantized forward pass; the
  plain step of the float model is the reference;
* accuracy on the digits test set after `--steps` steps from the same
  initial parameters over the same batches (kdq's `train_batches` with the
  run's seed), for each seed, evaluated with the same quantized forward pass.

Goals: kdq's step / the peer's step <= 1.0 at equal or better accuracy.
A configuration a library cannot run is reported with its error.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments.bench import common, libraries
from kdq.distill.objective import Objective
from kdq.models import create_model
from kdq.quant import init_quant_params
from kdq.train import TrainState, make_train_step

NAME = "peers"
DESCRIPTION = "kdq vs Qwix and AQT: QAT step time and accuracy on the same model and bits"
MODELS = ("mlp", "cnn")
BITS = (8, 4)
PEERS = ("qwix", "aqt")
LEARNING_RATE = 1e-3
KDQ = "kdq (make_train_step)"
KDQ_PLAIN = "kdq (plain step)"
AQT_CNN_NOTE = (
    "AQT's quantized conv has no gradient: its CNN step skips the conv backward pass "
    "and trains only the Dense layers"
)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One way of training a model: its state, step and quantized logits.

    Attributes:
      init: params -> training state.
      step: (state, batch) -> (new state, ...); jitted, state donated.
      logits: (state, images) -> logits of the trained model, quantized as in training.
    """

    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, ...]]
    logits: Callable[[Any, jax.Array], jax.Array]


def plain_setup(forward: libraries.Forward, tx: optax.GradientTransformation) -> Setup:
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
        init=lambda params: (params, tx.init(params)),
        step=jax.jit(step, donate_argnums=0),
        logits=jax.jit(lambda state, x: forward(state[0], x)),
    )


def kdq_setup(name: str, bits: int, example: jax.Array, tx: optax.GradientTransformation) -> Setup:
    """kdq's own train step (`make_train_step`) at W<bits>A<bits>."""
    model = create_model(name, num_classes=10)
    recipe = common.quant_recipe(bits)
    objective = Objective.from_config({"ce": {"weight": 1.0}})
    step = make_train_step(model, objective, tx, recipe=recipe)
    forward = libraries.forward("kdq", name, bits, example)

    def init(params):
        return TrainState.create(
            params=params,
            tx=tx,
            key=jax.random.PRNGKey(0),
            quant_params=init_quant_params(model, {"params": params}, recipe),
        )

    return Setup(
        init=init,
        step=lambda state, batch: step(state, None, batch),
        logits=jax.jit(lambda state, x: forward(state.params, x)),
    )


def setups(name: str, bits: int, example: jax.Array, tx) -> dict[str, Setup]:
    """Every way of training `name` at W<bits>A<bits> that is compared, by label."""
    found = {
        "float": plain_setup(libraries.forward("kdq", name, None, example), tx),
        KDQ: kdq_setup(name, bits, example, tx),
        KDQ_PLAIN: plain_setup(libraries.forward("kdq", name, bits, example), tx),
    }
    for peer in PEERS:
        found[peer] = plain_setup(libraries.forward(peer, name, bits, example), tx)
    return found


def copy(tree):
    """A copy of every array of `tree` (steps donate their state)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def error_text(error: Exception) -> str:
    """The first line of an error, prefixed by its type."""
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"


def runnable(found: dict[str, Setup], params, batch) -> tuple[dict[str, Setup], dict[str, str]]:
    """The setups whose first step compiles and runs, and the errors of the others."""
    ok, errors = {}, {}
    for label, setup in found.items():
        try:
            jax.block_until_ready(setup.step(setup.init(copy(params)), batch))
            ok[label] = setup
        except Exception as error:  # a library that cannot run a configuration is a result
            errors[label] = error_text(error)
    return ok, errors


def train_accuracy(setup: Setup, params, batches, test) -> float:
    """Test accuracy after one step per batch of `batches` from `params`."""
    state = setup.init(copy(params))
    for batch in batches:
        state = setup.step(state, batch)[0]
    return common.accuracy(lambda images: setup.logits(state, images), test)


def mean(values):
    """Mean of `values`, None when there are none."""
    return statistics.fmean(values) if values else None


def percent(value: float | None) -> str:
    """A fraction as a percentage, '-' for None."""
    return "-" if value is None else f"{100 * value:.2f}%"


def accuracy_text(values: list[float] | None) -> str:
    """'mean% [per seed]' of a list of accuracies."""
    if not values:
        return "-"
    return f"{percent(mean(values))} [{' '.join(f'{100 * v:.2f}' for v in values)}]"


def short(text: str, width: int = 100) -> str:
    """`text` cut to `width` characters for a table cell."""
    return text if len(text) <= width else text[: width - 3] + "..."


def seed_accuracies(setup: Setup, inits: dict[int, Any], seed_batches, test) -> list[float]:
    """Test accuracy of `setup` for each seed, from that seed's initial params and batches."""
    return [train_accuracy(setup, inits[seed], seed_batches[seed], test) for seed in inits]


def compare(name, config, peer, samples, accuracies, errors, seeds):
    """The comparison of kdq with `peer` on one model and config, and its goal checks."""
    note = AQT_CNN_NOTE if (peer, name) == ("aqt", "cnn") else ""
    if peer not in samples:
        note = f"{peer} cannot run {config} here: {short(errors.get(peer, ''))}"
        return {"model": name, "config": config, "peer": peer, "note": note}, []
    where = f"{name} {config}"
    comparison = {
        "model": name,
        "config": config,
        "peer": peer,
        "kdq_step_over_peer": common.paired_ratio(samples[KDQ], samples[peer]),
        "kdq_plain_step_over_peer": common.paired_ratio(samples[KDQ_PLAIN], samples[peer]),
        "kdq_mean_accuracy": mean(accuracies[KDQ]),
        "peer_mean_accuracy": mean(accuracies[peer]),
        "note": note,
    }
    goals = [
        common.goal(
            f"kdq make_train_step / {peer} step, {where}",
            comparison["kdq_step_over_peer"]["median"],
            1.0,
            at_most=True,
            note=note,
        ),
        common.goal(
            f"kdq / {peer}, same plain step, {where}",
            comparison["kdq_plain_step_over_peer"]["median"],
            1.0,
            at_most=True,
            note=note,
        ),
        common.goal(
            f"kdq accuracy - {peer} accuracy, {where}",
            comparison["kdq_mean_accuracy"] - comparison["peer_mean_accuracy"],
            0.0,
            at_most=False,
            note=f"mean over seeds {list(seeds)}",
        ),
    ]
    return comparison, goals


def main(argv=None) -> dict:
    """Measures, prints the tables and writes the JSON; returns the JSON document."""
    p = common.parser(__doc__, NAME)
    p.add_argument("--steps", type=int, default=300, help="training steps of the accuracy runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    data = common.digits()
    batch = common.first_batch(data)
    test = common.test_batches(data)
    tx = optax.adam(LEARNING_RATE)
    seed_batches = {
        seed: list(itertools.islice(common.train_stream(data, seed), args.steps))
        for seed in args.seeds
    }

    rows, comparisons, goals, time_lines, compare_lines = [], [], [], [], []
    for name in MODELS:
        model = create_model(name, num_classes=10)
        params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
        inits = {
            seed: model.init(jax.random.PRNGKey(seed), batch["image"])["params"]
            for seed in args.seeds
        }
        float_accuracy = None
        for bits in BITS:
            config = f"W{bits}A{bits}"
            found, errors = runnable(setups(name, bits, batch["image"], tx), params, batch)
            calls = {
                label: common.stepper(setup.step, setup.init(copy(params)), batch)
                for label, setup in found.items()
            }
            samples, numbers = common.time_interleaved(
                calls, repeats=args.repeats, warmup=args.warmup, min_sample_s=args.min_sample_s
            )
            if float_accuracy is None:
                float_accuracy = seed_accuracies(found["float"], inits, seed_batches, test)
            accuracies = {"float": float_accuracy}
            for label in (KDQ, *PEERS):
                if label in found:
                    accuracies[label] = seed_accuracies(found[label], inits, seed_batches, test)

            for label in [*found, *errors]:
                row = {
                    "model": name,
                    "config": config,
                    "library": label.split(" ")[0],
                    "step": "make_train_step" if label == KDQ else "plain",
                    "step_ms": common.ms(samples[label]) if label in samples else None,
                    "ratio_to_float": (
                        common.paired_ratio(samples[label], samples["float"])
                        if label in samples and label != "float"
                        else None
                    ),
                    "calls_per_sample": numbers.get(label),
                    "accuracy": accuracies.get(label),
                    "mean_accuracy": mean(accuracies.get(label)),
                    "error": errors.get(label),
                }
                rows.append(row)
                time_lines.append(
                    [
                        name,
                        config,
                        label,
                        common.fmt(row["step_ms"]),
                        common.fmt(row["ratio_to_float"]),
                        accuracy_text(row["accuracy"]),
                        short(row["error"] or ""),
                    ]
                )
            for peer in PEERS:
                comparison, checks = compare(
                    name, config, peer, samples, accuracies, errors, args.seeds
                )
                comparisons.append(comparison)
                goals += checks
                compare_lines.append(
                    [
                        name,
                        config,
                        peer,
                        common.fmt(comparison.get("kdq_step_over_peer")),
                        common.fmt(comparison.get("kdq_plain_step_over_peer")),
                        percent(comparison.get("kdq_mean_accuracy")),
                        percent(comparison.get("peer_mean_accuracy")),
                        comparison["note"],
                    ]
                )

    print(f"\n== Figure 2: {DESCRIPTION} (batch {common.BATCH_SIZE})")
    print(
        common.table(
            ["model", "bits", "library", "step ms", "x float plain step", "accuracy", "error"],
            time_lines,
        )
    )
    print(f"accuracy: mean over seeds {args.seeds} after {args.steps} steps, digits test set")
    print(
        common.table(
            [
                "model",
                "bits",
                "peer",
                "kdq make_train_step / peer",
                "same plain step: kdq / peer",
                "kdq acc",
                "peer acc",
                "note",
            ],
            compare_lines,
        )
    )
    print(common.goals_table(goals))
    settings = {
        **common.sampling_settings(args),
        "batch_size": common.BATCH_SIZE,
        "optimizer": f"adam({LEARNING_RATE})",
        "steps": args.steps,
        "seeds": args.seeds,
        "recipes": {f"W{b}A{b}": common.quant_recipe(b).to_json() for b in BITS},
        "how_applied": libraries.__doc__,
    }
    document = common.report(NAME, DESCRIPTION, settings, rows + comparisons, goals)
    common.write(document, args.out)
    return document


if __name__ == "__main__":
    main()
