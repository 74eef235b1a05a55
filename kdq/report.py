"""Summaries of runs: bit widths, provenance, a row per configuration over seeds, a table, a plot.

* `bits_summary(params, recipe)`: the bit width of every parameter and
  quantized activation, their labels ("2 (8: Conv_0, Dense_1)") and the
  average weight bits.
* `provenance()`: the kdq version and commit, jax, the device, Python.
* `summarize(name, reports)`: one row from the per-seed `report.json`s of a
  configuration (means and sample standard deviations over seeds).
* `format_table(rows)`: the fixed-width text tables printed by the demo and
  copied into the README, with legends: one for classification rows
  (accuracy), one for language-model rows (bits per byte, generation speed).
* `plot_accuracy_vs_size(rows, path)`: test accuracy against average weight
  bits and against payload bytes.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kdq.quant.recipe import QuantRecipe
from kdq.quant.spec import QuantSpec
from kdq.rules import PathRules, key_path_str

FLOAT_BITS = 32


def _bits_label(widths: Mapping[str, int], quantized: set[str]) -> tuple[int, str]:
    """(narrowest width, label) of the quantized entries of `widths` (32 when none).

    The label is the narrowest width, followed in parentheses by every other
    width with the layers that use it: "2 (8: Conv_0, Dense_1)"; more than
    three layers at one width are counted instead ("8: 5 layers").
    """
    used = sorted({widths[k] for k in quantized})
    if not used:
        return FLOAT_BITS, str(FLOAT_BITS)
    narrowest = used[0]
    others = []
    for bits in used[1:]:
        layers = sorted(k.removesuffix("/kernel") for k in quantized if widths[k] == bits)
        named = ", ".join(layers) if len(layers) <= 3 else f"{len(layers)} layers"
        others.append(f"{bits}: {named}")
    return narrowest, str(narrowest) + (f" ({'; '.join(others)})" if others else "")


def bits_summary(params: Any, recipe: QuantRecipe) -> dict[str, Any]:
    """Bit widths of a student's parameters and of its quantized activations.

    A parameter matched by a weight rule with a spec has that spec's bits; any
    other leaf keeps its float width (32 for float32, biases included). An
    activation (the input of a module that has a "kernel" parameter) matched
    by an activation rule has that rule's bits. With bits_i and size n_i of
    parameter leaf i,

        avg_weight_bits = sum_i bits_i * n_i / sum_i n_i

    over every parameter leaf, so 8-bit edge layers and float biases count.

    Args:
      params: the float param tree of the student (as in `TrainState.params`;
        arrays or ShapeDtypeStructs).
      recipe: its quantization recipe.

    Returns:
      {"weight_bits": narrowest quantized weight width (32 if none),
      "weight_bits_label": e.g. "4", "2 (8: Conv_0, Dense_1)", "32",
      "avg_weight_bits": float, "layer_bits": {param path: bits},
      "act_bits": narrowest quantized activation width (32 if none),
      "act_bits_label": as for weights, by module path}.
    """
    weight_rules = PathRules(recipe.weight_rules, QuantSpec, name="weight_rules")
    act_rules = PathRules(recipe.act_rules, QuantSpec, name="act_rules")
    layer_bits, sizes, quantized = {}, {}, set()
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = key_path_str(key_path)
        spec = weight_rules.value(path)
        if spec is None:
            layer_bits[path] = 8 * np.dtype(leaf.dtype).itemsize
        else:
            layer_bits[path] = spec.bits
            quantized.add(path)
        sizes[path] = math.prod(np.shape(leaf))
    total = sum(sizes.values())
    avg = sum(layer_bits[p] * sizes[p] for p in sizes) / total if total else float(FLOAT_BITS)
    weight_bits, weight_label = _bits_label(layer_bits, quantized)
    modules = sorted(p.removesuffix("/kernel") for p in layer_bits if p.endswith("/kernel"))
    act_widths, act_quantized = {}, set()
    for module in modules:
        spec = act_rules.value(module)
        act_widths[module] = FLOAT_BITS if spec is None else spec.bits
        if spec is not None:
            act_quantized.add(module)
    act_bits, act_label = _bits_label(act_widths, act_quantized)
    return {
        "weight_bits": weight_bits,
        "weight_bits_label": weight_label,
        "avg_weight_bits": avg,
        "layer_bits": layer_bits,
        "act_bits": act_bits,
        "act_bits_label": act_label,
    }


def kdq_commit() -> str:
    """HEAD of the kdq checkout ('+' appended when kdq/ has local changes), or "unknown".

    Returns:
      The 40-hex commit, with "+" when kdq/ differs from it; "unknown" outside git.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "kdq"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+" if changes else "") if commit else "unknown"


def provenance() -> dict[str, str]:
    """What produced a result: kdq's version and commit, jax, the device, Python.

    Returns:
      {"kdq_version", "kdq_commit" (git HEAD of the checkout kdq is imported
      from, with "+" when kdq/ has uncommitted changes; "unknown" outside
      git), "jax_version", "jaxlib_version", "device" (e.g. "cpu: 2 x cpu",
      "gpu: 1 x NVIDIA H200"), "python"}.
    """
    import jaxlib

    from kdq import __version__

    devices = jax.devices()
    return {
        "kdq_version": __version__,
        "kdq_commit": kdq_commit(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "device": f"{devices[0].platform}: {len(devices)} x {devices[0].device_kind}",
        "python": platform.python_version(),
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _no_integer_model_reason(row: Mapping[str, Any]) -> str:
    if row["weight_bits"] == FLOAT_BITS and row["act_bits"] == FLOAT_BITS:
        return "float model"
    if row["act_bits"] == FLOAT_BITS:
        return "float activations"
    if row["weight_bits"] == FLOAT_BITS:
        return "float weights"
    return "not evaluated in integers"


# The per-seed metrics a row summarises as mean and sample std, where every seed has them.
METRIC_FIELDS = (
    "val_accuracy",
    "test_accuracy",
    "test_accuracy_int",
    "val_bits_per_byte",
    "test_bits_per_byte",
    "test_bits_per_byte_int",
    "generate_tokens_per_second",
)


def summarize(name: str, reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from the `report.json`s of one configuration run with several seeds.

    Accuracies are given as the mean and the sample standard deviation over
    seeds (std 0 for one seed); `val_accuracy` only when every run has a
    validation split, `test_accuracy_int` only when every run has an integer
    model (otherwise "no_integer_model" says why: "float model", "float
    activations", "float weights" or "dynamic activation ranges").

    Args:
      name: the row's name.
      reports: per-seed reports from `kdq.train.train_and_evaluate`.

    Returns:
      {"name", "model", "params", "seeds", "weight_bits", "weight_bits_label",
      "avg_weight_bits", "act_bits", "act_bits_label", "task" (the reports'
      `task`, "classification" when absent), each of `METRIC_FIELDS` that
      every report has with its "<field>_std" (classification: val / test /
      integer test accuracy; language models: val / test / integer test bits
      per byte and generated tokens per second), ["no_integer_model"],
      "per_seed" ({accuracy key: [one value per seed]}), "payload_bytes"
      (the same for every seed: it depends on the architecture and recipe
      only), "disk_bytes" (mean over seeds, rounded), ["sparsity" (mean)]}.

    Raises:
      ValueError: no reports, or reports of different models or recipes.
    """
    if not reports:
        raise ValueError(f"run {name!r} has no reports to summarize")
    first = reports[0]
    for field in ("model", "params", "weight_bits_label", "act_bits_label", "payload_bytes"):
        values = {r[field] for r in reports}
        if len(values) > 1:
            raise ValueError(
                f"run {name!r}: the reports differ in {field!r} ({sorted(values)}); summarize "
                "the seeds of one configuration only"
            )
    row: dict[str, Any] = {
        "name": name,
        "model": first["model"],
        "params": first["params"],
        "seeds": [r["seed"] for r in reports],
    }
    for field in (
        "weight_bits",
        "weight_bits_label",
        "avg_weight_bits",
        "act_bits",
        "act_bits_label",
    ):
        row[field] = first[field]
    row["task"] = first.get("task", "classification")
    per_seed = {}
    for field in METRIC_FIELDS:
        if all(field in r for r in reports):
            per_seed[field] = [r[field] for r in reports]
            row[field], row[f"{field}_std"] = _mean_std(per_seed[field])
    if "test_accuracy_int" not in row and "test_bits_per_byte_int" not in row:
        row["no_integer_model"] = _no_integer_model_reason(row)
    row["per_seed"] = per_seed
    row["payload_bytes"] = first["payload_bytes"]
    row["disk_bytes"] = round(statistics.fmean(r["disk_bytes"] for r in reports))
    if all("sparsity" in r for r in reports):
        row["sparsity"] = statistics.fmean(r["sparsity"] for r in reports)
    return row


TABLE_HEADER = (
    "run",
    "model",
    "params",
    "W bits",
    "A bits",
    "val acc",
    "test acc",
    "int test acc",
    "payload B",
    "disk B",
    "sparsity",
)


def _accuracy(row: Mapping[str, Any], field: str) -> str:
    if field not in row:
        return "-"
    return f"{100 * row[field]:.2f} ± {100 * row[f'{field}_std']:.2f}"


def _fixed_width(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    """The header, a rule and the lines, each column as wide as its widest cell."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return [fmt.format(*header).rstrip(), rule, *(fmt.format(*line).rstrip() for line in lines)]


def _integer_legend(rows: Sequence[Mapping[str, Any]], column: str) -> list[str]:
    """The legend line saying which rows have no integer model, and why."""
    missing: dict[str, list[str]] = {}
    for row in rows:
        if "no_integer_model" in row:
            missing.setdefault(row["no_integer_model"], []).append(row["name"])
    if not missing:
        return []
    reasons = "; ".join(f"{', '.join(names)} ({why})" for why, names in missing.items())
    return [f"{column}: integer model (integer weights and activations); none for {reasons}"]


def _seeds_text(rows: Sequence[Mapping[str, Any]]) -> str:
    return "/".join(map(str, sorted({len(row["seeds"]) for row in rows})))


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width text tables of summary rows, each with a legend below it.

    Classification rows: run, model, params, W bits and A bits (labels from
    `bits_summary`: the narrowest width, other widths in parentheses), val /
    test / int test accuracy (mean ± sample std over seeds, in %), payload
    bytes, disk bytes, sparsity. "int test acc" is the exported integer
    model's (`kdq.quant.integer.integer_apply`); "-" where a run has none,
    and the legend says why. Language-model rows ("task":
    "language_modeling") follow in their own table (`format_lm_table`).

    Args:
      rows: summary rows from `summarize`.

    Returns:
      The tables as text: per table a header, a rule, one line per row, then
      the legend; a blank line between the tables.
    """
    classification = [r for r in rows if r.get("task", "classification") != "language_modeling"]
    language = [r for r in rows if r.get("task") == "language_modeling"]
    tables = [_classification_table(classification)] if classification else []
    if language:
        tables.append(format_lm_table(language))
    return "\n\n".join(tables)


def _classification_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        (
            row["name"],
            row["model"],
            f"{row['params']:,}",
            row["weight_bits_label"],
            row["act_bits_label"],
            _accuracy(row, "val_accuracy"),
            _accuracy(row, "test_accuracy"),
            _accuracy(row, "test_accuracy_int"),
            f"{row['payload_bytes']:,}",
            f"{row['disk_bytes']:,}",
            f"{100 * row['sparsity']:.0f} %" if "sparsity" in row else "-",
        )
        for row in rows
    ]
    legend = [
        f"accuracies: %, mean ± sample std over {_seeds_text(rows)} "
        "seed(s); W/A bits: narrowest width (other widths: layers)",
        "payload B: packed integers (at their bit width) + scales + zero points + float "
        "leaves; disk B: the exported orbax directory (compressed, metadata included)",
        *_integer_legend(rows, "int test acc"),
    ]
    return "\n".join([*_fixed_width(TABLE_HEADER, lines), "", *legend])


LM_TABLE_HEADER = (
    "run",
    "model",
    "params",
    "W bits",
    "A bits",
    "val bits/byte",
    "test bits/byte",
    "int test bits/byte",
    "payload B",
    "sparsity",
    "gen tok/s",
)


def _mean_std_text(row: Mapping[str, Any], field: str, digits: int) -> str:
    if field not in row:
        return "-"
    return f"{row[field]:.{digits}f} ± {row[f'{field}_std']:.{digits}f}"


def format_lm_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The language-model table: bits per byte (mean ± sample std over seeds), size, speed.

    Columns: run, model, params, W / A bits, val / test / integer-path test
    bits per byte (lower is better), payload bytes, sparsity and greedy
    cached generation speed of the final model (tokens per second, batch 1,
    `kdq.train.lm.generation_speed`).

    Args:
      rows: summary rows of language-model runs from `summarize`.

    Returns:
      The table as text: a header, a rule, one line per row, then the legend.
    """
    lines = [
        (
            row["name"],
            row["model"],
            f"{row['params']:,}",
            row["weight_bits_label"],
            row["act_bits_label"],
            _mean_std_text(row, "val_bits_per_byte", 3),
            _mean_std_text(row, "test_bits_per_byte", 3),
            _mean_std_text(row, "test_bits_per_byte_int", 3),
            f"{row['payload_bytes']:,}",
            f"{100 * row['sparsity']:.0f} %" if "sparsity" in row else "-",
            f"{row['generate_tokens_per_second']:.0f}"
            if "generate_tokens_per_second" in row
            else "-",
        )
        for row in rows
    ]
    legend = [
        f"bits/byte: next-byte cross-entropy / ln 2 over every held-out byte, mean ± sample "
        f"std over {_seeds_text(rows)} seed(s); gen tok/s: greedy generation with the KV "
        "cache, batch 1, this machine (fake-quantized forward for quantized rows)",
        *_integer_legend(rows, "int test bits/byte"),
    ]
    return "\n".join([*_fixed_width(LM_TABLE_HEADER, lines), "", *legend])


def _is_mixed(row: Mapping[str, Any]) -> bool:
    return "(" in row["weight_bits_label"] or "(" in row["act_bits_label"]


def plot_accuracy_vs_size(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """Saves a figure: test accuracy against average weight bits and against payload bytes.

    Both x axes are logarithmic with plain tick labels (powers of two for
    the bits, round byte counts); each run has its own colour, named in a
    legend (no annotations to overlap); mixed-precision runs (several bit
    widths) are drawn as squares, uniform ones as circles. Error bars: sample
    std over seeds.

    Args:
      rows: summary rows from `summarize`.
      path: where to write the image (format from the extension, e.g. .png).
    """
    from matplotlib import pyplot as plt

    fig = accuracy_vs_size_figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_vs_size_figure(rows: Sequence[Mapping[str, Any]]):
    """The matplotlib figure `plot_accuracy_vs_size` saves (close it with `plt.close`).

    Args:
      rows: summary rows from `summarize`.

    Returns:
      A `matplotlib.figure.Figure` with two axes: by average weight bits, by
      payload bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import lines, ticker
    from matplotlib import pyplot as plt

    if not rows:
        raise ValueError("rows is empty: there is nothing to plot")
    fig, (by_bits, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for i, row in enumerate(rows):
        accuracy = 100 * row["test_accuracy"]
        error = 100 * row["test_accuracy_std"]
        mixed = _is_mixed(row)
        style = {
            "fmt": "s" if mixed else "o",
            "color": colours(i % colours.N),
            "capsize": 3,
            "markersize": 7,
            "markeredgecolor": "black" if mixed else "none",
        }
        label = f"{row['name']} (W {row['weight_bits_label']}, A {row['act_bits_label']})"
        by_bits.errorbar(row["avg_weight_bits"], accuracy, yerr=error, label=label, **style)
        by_bytes.errorbar(row["payload_bytes"], accuracy, yerr=error, **style)
    by_bits.set(xscale="log", xlabel="average weight bits (log)", ylabel="test accuracy (%)")
    bits = [row["avg_weight_bits"] for row in rows]
    bit_ticks = [b for b in (1, 2, 4, 8, 16, 32) if min(bits) / 1.5 <= b <= max(bits) * 1.5]
    by_bits.set_xticks(bit_ticks, labels=[str(b) for b in bit_ticks])
    sizes = [row["payload_bytes"] for row in rows]
    by_bytes.set(xscale="log", xlabel="payload bytes (log)")
    lo, hi = math.floor(math.log10(min(sizes) / 1.5)), math.ceil(math.log10(max(sizes) * 1.5))
    steps = (1, 2, 5) if hi - lo <= 2 else (1, 3)  # at most ~7 labels that do not touch
    byte_ticks = [m * 10**e for e in range(lo, hi + 1) for m in steps]
    byte_ticks = [t for t in byte_ticks if min(sizes) / 1.5 <= t <= max(sizes) * 1.5]
    by_bytes.set_xticks(byte_ticks, labels=[_bytes_label(t) for t in byte_ticks])
    for axis in (by_bits, by_bytes):
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.xaxis.set_minor_locator(ticker.NullLocator())
        axis.margins(x=0.15)
        axis.grid(alpha=0.3)
    handles, labels = by_bits.get_legend_handles_labels()
    handles.append(
        lines.Line2D([], [], marker="s", linestyle="", color="grey", markeredgecolor="black")
    )
    labels.append("square: mixed precision (several bit widths)")
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("test accuracy against size (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.04 * math.ceil((len(rows) + 1) / 2) + 0.02, 1, 1))
    return fig


def _bytes_label(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"
