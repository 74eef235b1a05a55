"""What every benchmark shares: timing, statistics, the digits setup, tables and JSON.

Timing. Each configuration is warmed up (compilation, caches), then sampled
`repeats` times; a sample is the median wall time of `number` back-to-back
calls, each waited for with `jax.block_until_ready` (the median keeps the
pauses of a shared machine out of it), where `number` is chosen so that a
sample lasts at least `min_sample_s`. The configurations of one figure are
sampled round-robin (the starting one rotating each round), so a drift of the
machine's speed hits all of them alike, and a ratio between two of them is
taken per round (paired) before its median and range are reported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kdq.data import eval_batches, load_dataset, train_batches
from kdq.quant import QuantRecipe, QuantSpec
from kdq.report import kdq_commit

BATCH_SIZE = 256
DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "kdq", "qwix", "aqtp")


def quant_recipe(bits: int) -> QuantRecipe:
    """W<bits>A<bits>: weights per output channel, activations per tensor, dynamic ranges."""
    return QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=bits, axes=(-1,)))],
        act_rules=[(".*", QuantSpec(bits=bits))],
        act_mode="dynamic",
    )


def digits():
    """The embedded digits dataset (1437 train / 360 test 8x8x1 images)."""
    return load_dataset("digits")


def train_stream(data, seed: int, batch_size: int = BATCH_SIZE):
    """kdq's shuffled training batches of `data` for `seed`, as device arrays."""
    for batch in train_batches(data, batch_size=batch_size, seed=seed, num_threads=0):
        yield jax.device_put(batch)


def first_batch(data, seed: int = 0, batch_size: int = BATCH_SIZE) -> dict[str, jax.Array]:
    """One training batch of `batch_size` digits images and labels."""
    return next(train_stream(data, seed, batch_size))


def test_batches(data) -> list[dict[str, jax.Array]]:
    """The digits test split as one masked batch."""
    return [jax.device_put(b) for b in eval_batches(data, batch_size=len(data.test), num_threads=0)]


def accuracy(logits_fn: Callable[[jax.Array], jax.Array], batches) -> float:
    """Fraction of the unmasked examples of `batches` that `logits_fn` classifies correctly."""
    correct = count = 0
    for batch in batches:
        predicted = np.asarray(jax.device_get(logits_fn(batch["image"]).argmax(-1)))
        mask = np.asarray(batch["mask"])
        correct += int(np.sum((predicted == np.asarray(batch["label"])) & mask))
        count += int(np.sum(mask))
    return correct / count


def stepper(step: Callable[..., tuple[Any, ...]], state: Any, *args: Any) -> Callable[[], Any]:
    """A no-argument call of a train step that threads its (donated) state through.

    `step(state, *args)` returns (new_state, ...); each call feeds the previous
    call's new state back in, as a training loop does.
    """
    holder = [state]

    def call():
        outputs = step(holder[0], *args)
        holder[0] = outputs[0]
        return outputs

    return call


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 3,
    min_sample_s: float = 0.1,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per call of each entry of `calls`, sampled round-robin after warm-up.

    Args:
      calls: name -> a no-argument function whose result is waited for.
      repeats: samples per entry.
      warmup: untimed calls of each entry first.
      min_sample_s: least duration of one sample (sets the calls per sample).

    Returns:
      ({name: [median seconds per call, one per sample]}, {name: calls per sample}).
    """
    numbers = {}
    for name, call in calls.items():
        for _ in range(warmup):
            jax.block_until_ready(call())
        single = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(call())
            single.append(time.perf_counter() - start)
        numbers[name] = max(1, math.ceil(min_sample_s / max(min(single), 1e-7)))
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call, times = calls[name], []
            for _ in range(numbers[name]):
                start = time.perf_counter()
                jax.block_until_ready(call())
                times.append(time.perf_counter() - start)
            samples[name].append(statistics.median(times))
    return samples, numbers


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int]:
    """Median, min and max of `values` (times `scale`) and how many there are."""
    scaled = [scale * v for v in values]
    return {
        "median": statistics.median(scaled),
        "min": min(scaled),
        "max": max(scaled),
        "repeats": len(scaled),
    }


def ms(values: Sequence[float]) -> dict[str, float | int]:
    """`summary` of durations in seconds, in milliseconds."""
    return summary(values, 1e3)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """`summary` of the per-round ratios numerator[i] / denominator[i]."""
    return summary([n / d for n, d in zip(numerator, denominator, strict=True)])


def fmt(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    """'median (min-max)' of a `summary`, or '-' when there is none."""
    if not stat:
        return "-"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def goal(name: str, value: float | None, limit: float, *, at_most: bool, note: str = "") -> dict:
    """One goal check: `value` against `limit` (at most, or at least)."""
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {
        "goal": name,
        "value": value,
        "limit": limit,
        "direction": "<=" if at_most else ">=",
        "met": met,
        "note": note,
    }


def goals_table(goals: Sequence[Mapping[str, Any]]) -> str:
    """The goal checks as a table."""
    rows = []
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        met = {True: "met", False: "MISSED", None: "n/a"}[g["met"]]
        rows.append([g["goal"], value, f"{g['direction']} {g['limit']}", met, g["note"]])
    return table(["goal", "median", "target", "result", "note"], rows)


def machine() -> dict[str, Any]:
    """The machine the figures were measured on."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = names[0] if names else processor
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "processor": processor,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def versions() -> dict[str, str | None]:
    """Python and the versions of the libraries measured (None when not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["kdq_commit"] = kdq_commit()
    return found


def parser(
    description: str, name: str, *, repeats: int = 15, sampling: bool = True
) -> argparse.ArgumentParser:
    """The command-line options of a benchmark (`sampling`: the options of `time_interleaved`)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=repeats, help="timed samples per figure")
    if sampling:
        p.add_argument("--warmup", type=int, default=3, help="untimed calls before sampling")
        p.add_argument(
            "--min-sample-s", type=float, default=0.1, help="least duration of one timed sample"
        )
    p.add_argument(
        "--out", default=os.path.join("runs", "bench", f"{name}.json"), help="JSON output path"
    )
    return p


def sampling_settings(args) -> dict[str, Any]:
    """The sampling options every benchmark records in its JSON.

    Args:
      args: the parsed command line (from `parser`).

    Returns:
      {"repeats", "warmup", "min_sample_s"}.
    """
    return {"repeats": args.repeats, "warmup": args.warmup, "min_sample_s": args.min_sample_s}


def report(
    name: str,
    description: str,
    settings: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    goals: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON document of one benchmark."""
    return {
        "benchmark": name,
        "description": description,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": dict(settings),
        "figures": list(rows),
        "goals": list(goals),
        "notes": list(notes),
    }


def write(document: Mapping[str, Any], path: str) -> None:
    """Writes `document` as indented JSON to `path`, creating its directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")
