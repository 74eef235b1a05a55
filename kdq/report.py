"""Summaries of runs: a row per configuration, aggregated over seeds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax


def summarize(name: str, reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from the `report.json`s of the same configuration run with several seeds.

    Args:
      name: the row's name.
      reports: per-seed reports from `kdq.train.train_and_evaluate`.

    Returns:
      {"name", "model", "params", "weight_bits", "act_bits", "test_accuracy"
      (mean over seeds), "test_accuracy_std" (sample std, 0 for one seed),
      "seeds", "checkpoint_bytes" (of the first seed's export)}.
    """
    if not reports:
        raise ValueError(f"run {name!r} has no reports to summarize")
    accuracies = [r["test_accuracy"] for r in reports]
    first = reports[0]
    return {
        "name": name,
        "model": first["model"],
        "params": first["params"],
        "weight_bits": first["weight_bits"],
        "act_bits": first["act_bits"],
        "test_accuracy": statistics.fmean(accuracies),
        "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "seeds": [r["seed"] for r in reports],
        "checkpoint_bytes": first["checkpoint_bytes"],
    }


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of summary rows."""
    header = ("run", "model", "params", "W bits", "A bits", "test acc (mean ± std)", "bytes")
    lines = [
        (
            row["name"],
            row["model"],
            f"{row['params']:,}",
            str(row["weight_bits"]),
            str(row["act_bits"]),
            f"{100 * row['test_accuracy']:.2f} ± {100 * row['test_accuracy_std']:.2f} %",
            f"{row['checkpoint_bytes']:,}",
        )
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*line) for line in lines)])


def median_latency_ms(fn, *args: Any, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time in milliseconds of `fn(*args)` after warm-up calls.

    Args:
      fn: a (jitted) function; its outputs are waited for with
        `jax.block_until_ready`.
      *args: its arguments.
      warmup: untimed calls first (compilation, caches).
      repeats: timed calls.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
