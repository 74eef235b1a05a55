"""The README's MiniLM PTQ table is the table of the committed report of a real run."""

from __future__ import annotations

import json
import os

from experiments import ptq_minilm, readme_tables
from kdq.data.shakespeare import GENRES, plays_directory, split_plays

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
        assert 0.0 <= row["probe_accuracy"] <= 1.0


def test_passages_are_labelled_with_the_genre_of_their_play():
    plays = split_plays()["test"]
    texts = {
        genre: (plays_directory() / genre / f"{play}.md").read_bytes().decode("utf-8", "ignore")
        for genre, play in plays
    }  # one test play per genre
    passages, genres = ptq_minilm.passages("test", 40, seed=3)
    assert len(set(passages)) == 40 and set(genres) <= set(range(len(GENRES)))
    for passage, genre in zip(passages, genres, strict=True):
        assert passage in texts[GENRES[genre]]


def test_committed_report_has_the_probe_with_its_chance_levels():
    with open(REPORT) as f:
        probe = json.load(f)["probe"]
    assert probe["C"] in ptq_minilm.PROBE_C
    assert probe["chance_uniform"] == 1 / len(GENRES)
    assert 1 / len(GENRES) <= probe["chance_majority"] <= 1.0
    assert probe["chance_majority"] < probe["float_test_accuracy"] <= 1.0
