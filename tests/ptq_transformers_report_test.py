"""The README's LM PTQ table is the table of the committed benchmark document of a real run."""

from __future__ import annotations

import json
import os

import pytest

from experiments import readme_tables
from experiments.bench import ptq_transformers

REPORT = os.path.join(readme_tables.ROOT, "experiments", "results", "ptq_transformers.json")
BEGIN, END = "<!-- lm-ptq-table:begin -->", "<!-- lm-ptq-table:end -->"


@pytest.fixture(scope="module")
def document():
    with open(REPORT) as f:
        return json.load(f)


def test_readme_lm_table_is_the_committed_report(document):
    with open(readme_tables.README) as f:
        _, block, _ = readme_tables.split_readme(f.read(), BEGIN, END)
    assert block == f"```\n{ptq_transformers.format_table(document)}\n```"


def test_committed_report_has_every_case_and_the_float_rows(document):
    rows = document["figures"]
    quantized = [
        (r["library"], r["method"], r["weight_bits"], r["group_size"], r["act_bits"])
        for r in rows
        if r["weight_bits"] is not None
    ]
    assert quantized == list(ptq_transformers.cases())
    kv = sorted(r["kv_cache_bits"] or 0 for r in rows if r["weight_bits"] is None)
    assert kv == [0, 4, 8]
    for row in rows:
        assert 0.0 < row["test_bits_per_byte"] < 8.0 and row["calibration_s"] >= 0.0


def test_committed_goals_follow_from_the_committed_rows(document):
    recomputed = ptq_transformers.goals(document["figures"])
    assert [g["goal"] for g in recomputed] == [g["goal"] for g in document["goals"]]
    for mine, stored in zip(recomputed, document["goals"], strict=True):
        assert mine["value"] == pytest.approx(stored["value"], rel=1e-12)
        assert (stored["limit"], stored["direction"]) == (mine["limit"], mine["direction"])
        within = stored["value"] <= stored["limit"]
        if stored["direction"] == ">=":
            within = stored["value"] >= stored["limit"]
        assert stored["met"] == within
