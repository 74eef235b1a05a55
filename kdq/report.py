"""Summaries of runs: a row per configuration aggregated over seeds, a table, a figure."""

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
      "seeds", "checkpoint_bytes" (of the first seed's export)}, plus the mean
      of "sparsity" and "test_accuracy_int" and the median of "latency_ms_float" /
      "latency_ms_int" (batch "latency_batch_size") when the runs report them.
    """
    if not reports:
        raise ValueError(f"run {name!r} has no reports to summarize")
    accuracies = [r["test_accuracy"] for r in reports]
    first = reports[0]
    row = {
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
    if "sparsity" in first:
        row["sparsity"] = statistics.fmean(r["sparsity"] for r in reports)
    if "test_accuracy_int" in first:
        row["test_accuracy_int"] = statistics.fmean(r["test_accuracy_int"] for r in reports)
    for field in ("latency_ms_float", "latency_ms_int"):
        if field in first:
            row[field] = statistics.median(r[field] for r in reports)
    if "latency_batch_size" in first:
        row["latency_batch_size"] = first["latency_batch_size"]
    return row


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of summary rows.

    Args:
      rows: summary rows from `summarize`.

    Returns:
      The table as text, one line per row after a header.
    """
    header = (
        "run",
        "model",
        "params",
        "W bits",
        "A bits",
        "sparsity",
        "test acc (mean ± std)",
        "bytes",
        "float ms",
        "int ms",
    )

    def ms(row, field):
        return f"{row[field]:.2f}" if field in row else "-"

    lines = [
        (
            row["name"],
            row["model"],
            f"{row['params']:,}",
            str(row["weight_bits"]),
            str(row["act_bits"]),
            f"{100 * row['sparsity']:.0f} %" if "sparsity" in row else "-",
            f"{100 * row['test_accuracy']:.2f} ± {100 * row['test_accuracy_std']:.2f} %",
            f"{row['checkpoint_bytes']:,}",
            ms(row, "latency_ms_float"),
            ms(row, "latency_ms_int"),
        )
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*line) for line in lines)])


def plot_accuracy_vs_size(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """Saves a figure: test accuracy against weight bits and against bytes on disk.

    Args:
      rows: summary rows from `summarize`.
      path: where to write the image (format from the extension, e.g. .png).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (by_bits, by_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        accuracy = 100 * row["test_accuracy"]
        error = 100 * row["test_accuracy_std"]
        by_bits.errorbar(row["weight_bits"], accuracy, yerr=error, fmt="o", capsize=3)
        by_bits.annotate(row["name"], (row["weight_bits"], accuracy), fontsize=7)
        by_bytes.errorbar(row["checkpoint_bytes"], accuracy, yerr=error, fmt="o", capsize=3)
        by_bytes.annotate(row["name"], (row["checkpoint_bytes"], accuracy), fontsize=7)
    by_bits.set(xscale="log", xlabel="weight bits", ylabel="test accuracy (%)")
    by_bits.set_xticks([2, 4, 8, 32], labels=["2", "4", "8", "32"])
    by_bytes.set(xscale="log", xlabel="model bytes on disk", ylabel="test accuracy (%)")
    for axis in (by_bits, by_bytes):
        axis.grid(alpha=0.3)
    fig.suptitle("accuracy against size (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def median_latency_ms(fn, *args: Any, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time in milliseconds of `fn(*args)` after warm-up calls.

    Args:
      fn: a (jitted) function; its outputs are waited for with
        `jax.block_until_ready`.
      *args: its arguments.
      warmup: untimed calls first (compilation, caches).
      repeats: timed calls.

    Returns:
      The median time of the timed calls, in milliseconds.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
