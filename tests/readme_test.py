"""The README's examples run as written, and its quick start is two commands."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _blocks(language):
    with open(README) as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), flags=re.S)


def test_quick_start_is_exactly_the_demo_and_the_test_command():
    commands = [line.split("#")[0].strip() for line in _blocks("sh")[0].splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


@pytest.mark.slow
def test_python_examples_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    blocks = _blocks("python")
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, README, "exec"), namespace)  # noqa: S102
    assert namespace["qparams"]["kernel"].qvalue.dtype.name == "int4"
    assert namespace["logits"].shape == (16, 10)
    assert namespace["restored"].recipe == namespace["recipe"]
