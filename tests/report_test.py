"""Bit widths, provenance, summaries, the table and the plot of `kdq.report`."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from kdq.quant import QuantSpec
from kdq.quant.recipe import QuantRecipe
from kdq.report import (
    accuracy_vs_size_figure,
    bits_summary,
    format_table,
    plot_accuracy_vs_size,
    provenance,
    summarize,
)

PARAMS = {
    "Dense_0": {"kernel": np.zeros((64, 32), np.float32), "bias": np.zeros(32, np.float32)},
    "Dense_1": {"kernel": np.zeros((32, 10), np.float32), "bias": np.zeros(10, np.float32)},
}


def test_bits_summary_of_mixed_precision_counts_every_leaf():
    recipe = QuantRecipe(
        weight_rules=[("Dense_1/kernel", QuantSpec(bits=8)), (".*kernel", QuantSpec(bits=2))],
        act_rules=[("Dense_1", QuantSpec(bits=8)), (".*", QuantSpec(bits=4))],
    )
    summary = bits_summary(PARAMS, recipe)
    n = 64 * 32 + 32 + 32 * 10 + 10
    assert summary["avg_weight_bits"] == pytest.approx(
        (64 * 32 * 2 + 32 * 10 * 8 + (32 + 10) * 32) / n
    )
    assert summary["layer_bits"] == {
        "Dense_0/bias": 32,
        "Dense_0/kernel": 2,
        "Dense_1/bias": 32,
        "Dense_1/kernel": 8,
    }
    assert (summary["weight_bits"], summary["weight_bits_label"]) == (2, "2 (8: Dense_1)")
    assert (summary["act_bits"], summary["act_bits_label"]) == (4, "4 (8: Dense_1)")


def test_bits_summary_of_uniform_and_float_recipes():
    uniform = bits_summary(PARAMS, QuantRecipe(weight_rules=[(".*kernel", QuantSpec(bits=4))]))
    assert (uniform["weight_bits"], uniform["weight_bits_label"]) == (4, "4")
    assert (uniform["act_bits"], uniform["act_bits_label"]) == (32, "32")
    float_ = bits_summary(PARAMS, QuantRecipe())
    assert float_["weight_bits_label"] == "32" and float_["avg_weight_bits"] == 32.0
    assert set(float_["layer_bits"].values()) == {32}
    half = jax.tree_util.tree_map(lambda x: x.astype(np.float16), PARAMS)
    assert bits_summary(half, QuantRecipe())["avg_weight_bits"] == 16.0


def test_provenance_names_the_versions_and_the_device():
    found = provenance()
    assert set(found) == {
        "kdq_version",
        "kdq_commit",
        "jax_version",
        "jaxlib_version",
        "device",
        "python",
    }
    assert found["jax_version"] == jax.__version__
    assert re.fullmatch(r"[0-9a-f]{40}\+?|unknown", found["kdq_commit"])
    device = jax.devices()[0]
    assert found["device"] == f"{device.platform}: {len(jax.devices())} x {device.device_kind}"


def _report(seed, test, val=None, test_int=None, **extra):
    report = {
        "model": "cnn",
        "params": 1234,
        "seed": seed,
        "test_accuracy": test,
        "payload_bytes": 1000,
        "disk_bytes": 2000 + seed,
        "weight_bits": 4,
        "weight_bits_label": "4",
        "avg_weight_bits": 4.5,
        "act_bits": 4,
        "act_bits_label": "4",
        **extra,
    }
    if val is not None:
        report["val_accuracy"] = val
    if test_int is not None:
        report["test_accuracy_int"] = test_int
    return report


def test_summarize_means_and_sample_stds():
    reports = [_report(0, 0.90, 0.80, 0.89), _report(1, 0.95, 0.90, 0.93)]
    row = summarize("w4a4", reports)
    assert row["test_accuracy"] == pytest.approx(0.925)
    # sample std of two values a, b: |a - b| / sqrt(2)
    assert row["test_accuracy_std"] == pytest.approx(0.05 / np.sqrt(2))
    assert row["val_accuracy"] == pytest.approx(0.85)
    assert row["val_accuracy_std"] == pytest.approx(0.1 / np.sqrt(2))
    assert row["test_accuracy_int"] == pytest.approx(0.91)
    assert row["per_seed"]["test_accuracy_int"] == [0.89, 0.93]
    assert row["seeds"] == [0, 1] and row["disk_bytes"] == 2000  # round(2000.5) is even
    assert row["payload_bytes"] == 1000 and "no_integer_model" not in row
    one = summarize("one", [_report(0, 0.9)])
    assert one["test_accuracy_std"] == 0.0 and "val_accuracy" not in one
    assert one["no_integer_model"] == "not evaluated in integers"


def test_summarize_says_why_there_is_no_integer_model():
    float_ = _report(
        0, 0.9, weight_bits=32, act_bits=32, weight_bits_label="32", act_bits_label="32"
    )
    assert summarize("f", [float_])["no_integer_model"] == "float model"
    weights_only = _report(0, 0.9, act_bits=32, act_bits_label="32")
    assert summarize("w", [weights_only])["no_integer_model"] == "float activations"


def test_summarize_refuses_reports_of_different_configurations():
    with pytest.raises(ValueError, match="run 'x' has no reports"):
        summarize("x", [])
    with pytest.raises(ValueError, match=r"run 'x': the reports differ in 'payload_bytes'"):
        summarize("x", [_report(0, 0.9), _report(1, 0.9, payload_bytes=5)])


ROWS = [
    summarize(
        "teacher",
        [
            _report(
                0,
                0.975,
                0.98,
                weight_bits=32,
                act_bits=32,
                weight_bits_label="32",
                act_bits_label="32",
                avg_weight_bits=32.0,
                payload_bytes=212_000,
            )
        ],
    ),
    summarize(
        "qat_w2a2",
        [
            _report(
                0,
                0.9,
                0.91,
                0.895,
                weight_bits=2,
                weight_bits_label="2 (8: Conv_0, Dense_1)",
                act_bits=2,
                act_bits_label="2 (8: Conv_0, Dense_1)",
                avg_weight_bits=2.6,
                sparsity=0.5,
            )
        ],
    ),
]


def test_format_table_is_the_documented_text():
    expected = """\
run       model  params  W bits                  A bits                  val acc       test acc      int test acc  payload B  disk B  sparsity
--------  -----  ------  ----------------------  ----------------------  ------------  ------------  ------------  ---------  ------  --------
teacher   cnn    1,234   32                      32                      98.00 ± 0.00  97.50 ± 0.00  -             212,000    2,000   -
qat_w2a2  cnn    1,234   2 (8: Conv_0, Dense_1)  2 (8: Conv_0, Dense_1)  91.00 ± 0.00  90.00 ± 0.00  89.50 ± 0.00  1,000      2,000   50 %

accuracies: %, mean ± sample std over 1 seed(s); W/A bits: narrowest width (other widths: layers)
payload B: packed integers (at their bit width) + scales + zero points + float leaves; disk B: the exported orbax directory (compressed, metadata included)
int test acc: integer model (integer weights and activations); none for teacher (float model)"""
    assert format_table(ROWS) == expected


def test_plot_has_plain_ticks_a_legend_and_marks_mixed_precision(tmp_path):
    from matplotlib import pyplot as plt

    fig = accuracy_vs_size_figure(ROWS)
    by_bits, by_bytes = fig.axes
    assert [t.get_text() for t in by_bits.get_xticklabels()] == ["2", "4", "8", "16", "32"]
    assert [t.get_text() for t in by_bytes.get_xticklabels()] == [
        "1 kB",
        "3 kB",
        "10 kB",
        "30 kB",
        "100 kB",
        "300 kB",
    ]
    assert not by_bits.get_xticklabels(minor=True) and not by_bytes.get_xticklabels(minor=True)
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert names[:2] == [
        "teacher (W 32, A 32)",
        "qat_w2a2 (W 2 (8: Conv_0, Dense_1), A 2 (8: Conv_0, Dense_1))",
    ]
    markers = [container.lines[0].get_marker() for container in by_bits.containers]
    assert markers == ["o", "s"]  # uniform precision: circle; mixed: square
    plt.close(fig)
    plot_accuracy_vs_size(ROWS, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _lm_report(seed, test_bpb, **extra):
    report = _report(seed, None, task="language_modeling", **extra)
    del report["test_accuracy"]
    return {
        **report,
        "model": "lm_tiny",
        "val_bits_per_byte": test_bpb + 0.1,
        "test_bits_per_byte": test_bpb,
        "generate_tokens_per_second": 1000.0 + seed,
    }


def test_summarize_language_models_over_seeds():
    row = summarize("lm", [_lm_report(0, 2.0), _lm_report(1, 2.2)])
    assert row["task"] == "language_modeling"
    assert row["test_bits_per_byte"] == pytest.approx(2.1)
    assert row["test_bits_per_byte_std"] == pytest.approx(0.2 / np.sqrt(2))
    assert row["val_bits_per_byte"] == pytest.approx(2.2)
    assert row["generate_tokens_per_second"] == pytest.approx(1000.5)
    assert "test_accuracy" not in row and row["no_integer_model"] == "not evaluated in integers"
    assert summarize("image", [_report(0, 0.9)])["task"] == "classification"


def test_format_table_puts_language_models_in_their_own_table():
    lm = summarize("lm_kd", [_lm_report(0, 2.0, sparsity=0.5)])
    expected_lm = """\
run    model    params  W bits  A bits  val bits/byte  test bits/byte  int test bits/byte  payload B  sparsity  gen tok/s
-----  -------  ------  ------  ------  -------------  --------------  ------------------  ---------  --------  ---------
lm_kd  lm_tiny  1,234   4       4       2.100 ± 0.000  2.000 ± 0.000   -                   1,000      50 %      1000"""
    text = format_table([*ROWS, lm])
    image, language = text.split("\n\n", 2)[:2], text.split("\n\n")[-2:]
    assert format_table(ROWS) == "\n\n".join(image)
    assert "\n\n".join(language).startswith(expected_lm)
    assert "bits/byte: next-byte cross-entropy / ln 2" in language[1]
