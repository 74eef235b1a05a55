"""The README's demo table is the table of the committed demo report."""

from __future__ import annotations

import json

import pytest

from experiments import readme_tables
from kdq.report import format_table


def test_readme_demo_table_is_the_committed_report():
    with open(readme_tables.README) as f:
        _, block, _ = readme_tables.split_readme(f.read())
    with open(readme_tables.REPORT) as f:
        report = json.load(f)
    assert block == f"```\n{format_table(report['runs'])}\n```"


def test_committed_report_records_what_ran_and_where():
    with open(readme_tables.REPORT) as f:
        report = json.load(f)
    assert report["seeds"] and set(report["configs"]) == {row["name"] for row in report["runs"]}
    assert report["provenance"]["kdq_commit"] != "unknown"
    tasks = {row.get("task", "classification") for row in report["runs"]}
    assert tasks == {"classification", "language_modeling"}
    for row in report["runs"]:
        if row.get("task", "classification") == "classification":
            assert row["seeds"] == report["seeds"]
            assert "val_accuracy" in row and "test_accuracy" in row
            integer = "test_accuracy_int" in row
        else:
            assert row["seeds"] == report["lm_seeds"]
            assert "val_bits_per_byte" in row and "test_bits_per_byte" in row
            assert row["generate_tokens_per_second"] > 0
            integer = "test_bits_per_byte_int" in row
        assert integer != ("no_integer_model" in row)


def _row(name):
    return {
        "name": name,
        "model": "mlp",
        "params": 10,
        "seeds": [0],
        "weight_bits_label": "4",
        "act_bits_label": "32",
        "weight_bits": 4,
        "act_bits": 32,
        "test_accuracy": 0.5,
        "test_accuracy_std": 0.0,
        "no_integer_model": "float activations",
        "payload_bytes": 7,
        "disk_bytes": 9,
    }


def test_readme_tables_rewrites_only_the_marked_block(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"runs": [_row("a")]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_tables.BEGIN}\nstale table\n{readme_tables.END}\noutro\n")
    args = ["--readme", str(readme), "--report", str(report)]
    assert readme_tables.main([*args, "--check"]) == 1
    assert readme_tables.main(args) == 0
    table = format_table([_row("a")])
    assert readme.read_text() == (
        f"intro\n{readme_tables.BEGIN}\n```\n{table}\n```\n{readme_tables.END}\noutro\n"
    )
    assert readme_tables.main([*args, "--check"]) == 0
    assert readme_tables.main(args) == 0  # idempotent
    assert readme.read_text().count("intro") == 1


def test_missing_markers_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="exactly one line '<!-- demo-table:begin -->'"):
        readme_tables.split_readme(f"{readme_tables.END}\n{readme_tables.BEGIN}\n")
    with pytest.raises(ValueError, match=r"found 0 and 0"):
        readme_tables.split_readme("no markers\n")
