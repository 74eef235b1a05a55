"""What every benchmark shares: the digits setup, timing, statistics and the runner.

A `Benchmark` declares its figures: each `Figure` holds calls timed side by side
and the rows and goals made of their times (`ms`, `ratio`, `calls_per_sample`);
`Benchmark.run` measures them, prints the tables and goals and writes the JSON.

Timing. Each call is warmed up (compilation, caches), then sampled `repeats`
times; a sample is the median wall time of `number` back-to-back calls, each
waited for with `jax.block_until_ready` (the median keeps the pauses of a
shared machine out of it), where `number` is chosen so that a sample lasts at
least `min_sample_s`. The calls of one figure are sampled round-robin (the
starting one rotating each round), so a drift of the machine's speed hits all
of them alike, and a ratio between two of them is taken per round (paired)
before its median and range are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import operator
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kdq.data import eval_batches, load_dataset, train_batches
from kdq.distill.objective import Objective
from kdq.quant import FLOAT, QuantRecipe, QuantSpec, init_quant_params
from kdq.report import kdq_commit
from kdq.train import TrainState, make_train_step

BATCH_SIZE = 256
OPTIMIZER, TX = "adam(1e-3)", optax.adam(1e-3)  # the optimizer of every train step measured
DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "kdq", "qwix", "aqtp")


def quant_recipe(bits: int | None, act_mode: str = "dynamic") -> QuantRecipe:
    """W<bits>A<bits>: weights per output channel, activations per tensor; None: FLOAT."""
    if bits is None:
        return FLOAT
    return QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=bits, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=bits))],
        act_mode=act_mode,
    )


def recipes(configs: Iterable[tuple[str, int | None]]) -> dict[str, Any]:
    """The JSON of `quant_recipe(bits)` by label (None for the float model)."""
    return {
        label: None if bits is None else quant_recipe(bits).to_json() for label, bits in configs
    }


def batches(split: str = "train", *, seed: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Digits (1437 train / 360 test 8x8x1 images) as device batches: "train", kdq's
    shuffled training batches of `BATCH_SIZE` for `seed`; "test", one masked batch.
    """
    data = load_dataset("digits")
    if split == "train":
        found = train_batches(data, batch_size=BATCH_SIZE, seed=seed, num_threads=0)
    else:
        found = eval_batches(data, batch_size=len(data.test), num_threads=0)
    for batch in found:
        yield jax.device_put(batch)


def init_params(model, batch, seed: int = 0):
    """`model`'s initial params for PRNGKey(seed), shaped by `batch`'s images."""
    return model.init(jax.random.PRNGKey(seed), batch["image"])["params"]


def copy(tree):
    """A copy of every array of `tree` (the steps donate their state)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def train_state(model, params, recipe: QuantRecipe) -> TrainState:
    """A step-0 `TrainState` holding a copy of `params`."""
    params = copy(params)
    quant_params = init_quant_params(model, {"params": params}, recipe)
    return TrainState.create(
        params=params, tx=TX, key=jax.random.PRNGKey(0), quant_params=quant_params
    )


def train_step(model, recipe: QuantRecipe, objective: Objective | None = None, teacher=None):
    """kdq's `make_train_step` with `TX`; `objective` defaults to cross-entropy alone."""
    objective = objective or Objective.from_config({"ce": {"weight": 1.0}})
    return make_train_step(model, objective, TX, teacher=teacher, recipe=recipe)


def train_call(model, params, recipe, batch, objective=None, teacher=None, teacher_variables=None):
    """A no-argument call of `train_step(...)` from `train_state(...)`."""
    step = train_step(model, recipe, objective, teacher)
    return stepper(step, train_state(model, params, recipe), teacher_variables, batch)


def stepper(step: Callable[..., tuple[Any, ...]], state: Any, *args: Any) -> Callable[[], Any]:
    """A no-argument call of `step(state, *args) -> (new_state, ...)` that threads the state."""

    def call():
        nonlocal state
        state, *outputs = step(state, *args)
        return (state, *outputs)

    return call


def time_interleaved(calls, *, repeats: int, warmup=3, min_sample_s=0.1, clock=time.perf_counter):
    """({name: seconds per call, one per sample}, {name: calls per sample}) of `calls`
    (name -> a no-argument call), sampled as the module says.
    """

    def timed(call):
        start = clock()
        jax.block_until_ready(call())
        return clock() - start

    numbers = {}
    for name, call in calls.items():
        for _ in range(warmup):
            jax.block_until_ready(call())
        single = min(timed(call) for _ in range(3))
        numbers[name] = max(1, math.ceil(min_sample_s / max(single, 1e-7)))
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times = [timed(calls[name]) for _ in range(numbers[name])]
            samples[name].append(statistics.median(times))
    return samples, numbers


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int]:
    """Median, min and max of `values` (times `scale`) and how many there are."""
    s = [scale * v for v in values]
    return {"median": statistics.median(s), "min": min(s), "max": max(s), "repeats": len(s)}


def _total(samples: Mapping[str, Sequence[float]], names: str | Sequence[str]) -> list[float]:
    names = [names] if isinstance(names, str) else names
    return [sum(times) for times in zip(*(samples[name] for name in names), strict=True)]


def ms(calls: str | Sequence[str]) -> Callable:
    """`summary` of the per-round total milliseconds of `calls`."""
    return lambda samples, numbers: summary(_total(samples, calls), 1e3)


def ratio(calls: str | Sequence[str], over: str | Sequence[str]) -> Callable:
    """`summary` of the per-round ratios of the total time of `calls` to that of `over`."""

    def measure(samples, numbers):
        pairs = zip(_total(samples, calls), _total(samples, over), strict=True)
        return summary([n / d for n, d in pairs])

    return measure


def calls_per_sample(names: str | Sequence[str]) -> Callable:
    """The calls per sample of `names`: an int for one name, a dict by name for several."""
    one = isinstance(names, str)
    return lambda samples, numbers: numbers[names] if one else {n: numbers[n] for n in names}


def goal(name: str, value: Any, limit: float, *, at_most: bool = True, note: str = "") -> dict:
    """A goal check: `value` (a number, or a measure whose median is checked) against `limit`."""
    direction = "<=" if at_most else ">="
    return dict(goal=name, value=value, limit=limit, direction=direction, met=None, note=note)


@dataclasses.dataclass(frozen=True)
class Figure:
    """Calls timed side by side, and the rows and `goal`s made of their times: a measure
    in a row or goal (`ms`, `ratio`, `calls_per_sample`) is replaced by what it measures.
    """

    calls: Mapping[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)
    rows: Sequence[Mapping[str, Any]] = ()
    goals: Sequence[Mapping[str, Any]] = ()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def cell(value: Any) -> str:
    """A table cell: 'median (min-max)' of a summary, '-' for None, numbers to 4 digits."""
    if isinstance(value, dict):
        return "{median:.4g} ({min:.4g}-{max:.4g})".format(**value)
    if isinstance(value, list):
        return " ".join(map(cell, value))
    text = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."


def rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """`rows` as a table of their fields, but those holding a dict that is not a summary."""
    shown = {
        k: 0 for row in rows for k, v in row.items() if not isinstance(v, dict) or "median" in v
    }
    return table(list(shown), [[cell(row.get(k)) for k in shown] for row in rows])


def goals_table(goals: Sequence[Mapping[str, Any]]) -> str:
    """The goal checks as a table."""
    rows = []
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        met = {True: "met", False: "MISSED", None: "n/a"}[g["met"]]
        rows.append([g["goal"], value, f"{g['direction']} {g['limit']}", met, g["note"]])
    return table(["goal", "median", "target", "result", "note"], rows)


def environment() -> dict[str, dict[str, Any]]:
    """The machine measured on, and the versions of Python and of `DISTRIBUTIONS` (None:
    not installed).
    """
    processor = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = names[0] if names else processor
    installed = {d.name: d.version for d in importlib.metadata.distributions()}
    machine = {
        "platform": platform.platform(),
        "processor": processor,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }
    versions = {"python": platform.python_version()} | {n: installed.get(n) for n in DISTRIBUTIONS}
    return {"machine": machine, "versions": versions | {"kdq_commit": kdq_commit()}}


OPTIONS = {  # every benchmark's command-line options: argparse keywords by destination
    "repeats": dict(type=int, help="timed samples per figure"),
    "warmup": dict(type=int, default=3, help="untimed calls before sampling"),
    "min_sample_s": dict(type=float, default=0.1, help="least seconds of a sample"),
    "steps": dict(type=int, default=300, help="training steps of the accuracy runs"),
    "seeds": dict(type=int, nargs="+", default=[0, 1, 2], help="seeds of the accuracy runs"),
}
SAMPLING = ("repeats", "warmup", "min_sample_s")  # the options of `time_interleaved`


def add_options(p: argparse.ArgumentParser, names: Iterable[str], **overrides) -> None:
    """Adds the `OPTIONS` of `names` to `p`, `overrides` replacing argparse keywords."""
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), **{**OPTIONS[name], **overrides})


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark script: `figures(args)` yields its `Figure`s for the options it takes.

    `tables`: the title of the one table, or {title: which rows it shows} in the
    order the JSON lists the rows; a title is formatted with the description, the
    options and the `settings` (what the JSON records besides the options).
    """

    name: str
    description: str
    figures: Callable[[argparse.Namespace], Iterable[Figure]]
    settings: Mapping[str, Any]
    tables: str | Mapping[str, Callable[[Mapping[str, Any]], bool]]
    repeats: int = 15
    options: Sequence[str] = SAMPLING

    def main(self, argv: Sequence[str] | None = None, **given) -> dict:
        """Parses `argv` (`given` options replace them) and `run`s; --help: the script's doc."""
        p = argparse.ArgumentParser(
            description=sys.modules[self.figures.__module__].__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_options(p, self.options)
        p.set_defaults(repeats=self.repeats)
        p.add_argument("--out", default=os.path.join("runs", "bench", f"{self.name}.json"))
        return self.run(argparse.Namespace(**{**vars(p.parse_args(argv)), **given}))

    def run(self, args: argparse.Namespace, clock=time.perf_counter) -> dict:
        """Measures the figures in turn, prints the tables and goals; writes, returns the JSON."""
        options = {k: v for k, v in vars(args).items() if k != "out"}
        rows, goals = [], []
        for figure in self.figures(args):
            samples, numbers = {}, {}
            if figure.calls:
                sampling = {k: options[k] for k in SAMPLING}
                samples, numbers = time_interleaved(figure.calls, **sampling, clock=clock)
            filled = [
                {k: v(samples, numbers) if callable(v) else v for k, v in entry.items()}
                for entry in (*figure.rows, *figure.goals)
            ]
            rows += filled[: len(figure.rows)]
            for check in filled[len(figure.rows) :]:
                value = check["value"]
                value = check["value"] = value["median"] if isinstance(value, dict) else value
                compare = operator.le if check["direction"] == "<=" else operator.ge
                check["met"] = None if value is None else compare(value, check["limit"])
                goals.append(check)
        tables = {self.tables: lambda row: True} if isinstance(self.tables, str) else self.tables
        fields = {"description": self.description, **options, **self.settings}
        tables = {title.format(**fields): shows for title, shows in tables.items()}
        for title, shows in tables.items():
            print(f"\n== {title}\n{rows_table([row for row in rows if shows(row)])}")
        if goals:
            print(goals_table(goals))
        document = {
            "benchmark": self.name,
            "description": self.description,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **environment(),
            "settings": {**options, **self.settings},
            "figures": [row for shows in tables.values() for row in rows if shows(row)],
            "goals": goals,
            "notes": [],
        }
        write(document, args.out)
        return document


def write(document: Mapping[str, Any], path: str) -> None:
    """Writes `document` as indented JSON to `path`, creating its directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")
