"""The README's MiniLM PTQ table is the table of the committed report of a real run."""

from __future__ import annotations

import json
import os

from experiments import ptq_minilm, readme_tables

REPORT = os.path.join(readme_tables.ROOT, "experiments", "results", "ptq_minilm_report.json")
BEGIN, END = "<!-- minilm-ptq-table:begin -->", "<!-- minilm-ptq-table:end -->"


def test_readme_minilm_table_is_the_committed_report():
    with open(readme_tables.README) as f:
        _, block, _ = readme_tables.split_readme(f.read(), BEGIN, END)
    with open(REPORT) as f:
        report = json.load(f)
    assert block == f"```\n{ptq_minilm.format_table(report)}\n```"


def test_committed_report_covers_every_method_with_sane_figures():
    with open(REPORT) as f:
        report = json.load(f)
    expected = {(label, name) for label, name, _, _ in ptq_minilm.rows()}
    assert {(r["recipe"], r["method"]) for r in report["rows"]} == expected
    for row in report["rows"]:
        assert -1.0 <= row["min_cosine"] <= row["mean_cosine"] <= 1.0
        assert 0.0 <= row["nn_agreement"] <= 1.0 and row["calibration_s"] > 0
