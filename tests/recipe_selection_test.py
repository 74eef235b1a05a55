"""The digits configs hold the recipes chosen on validation (experiments/select_recipes.py)."""

import json
import pathlib

import pytest

from experiments.configs import digits_kd, digits_qat_w2a2_kd, digits_teacher

SELECTION = pathlib.Path(__file__).parents[1] / "experiments" / "results" / "recipe_selection.json"
CONFIGS = {
    "teacher_augment": digits_teacher,
    "kd": digits_kd,
    "w2a2_kd_weight": digits_qat_w2a2_kd,
}


@pytest.fixture(scope="module")
def selection():
    with open(SELECTION) as f:
        return json.load(f)


def test_every_decision_was_made_on_validation(selection):
    assert selection["selected_on"] == "validation"
    assert sorted(d["name"] for d in selection["decisions"]) == sorted(CONFIGS)
    for decision in selection["decisions"]:
        by_validation = max(
            decision["candidates"], key=lambda c: (c["val_accuracy"], -c["val_loss"])
        )
        assert decision["chosen"] == by_validation["values"]
        for candidate in decision["candidates"]:
            assert len(candidate["val_accuracy_by_seed"]) == len(selection["seeds"])
            assert 0.0 < candidate["val_accuracy"] <= 1.0


@pytest.mark.parametrize("decision", sorted(CONFIGS))
def test_configs_hold_the_chosen_values(selection, decision):
    chosen = next(d["chosen"] for d in selection["decisions"] if d["name"] == decision)
    config = CONFIGS[decision].get_config()
    for field, value in chosen.items():
        node = config
        for part in field.split("."):
            node = node[part]
        assert node == value, (decision, field)
