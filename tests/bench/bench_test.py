"""The benchmark harness: statistics, timing, the runner, and how the peers are applied."""

import argparse
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import common
from kdq.models import create_model


def test_summary_and_paired_ratio():
    assert common.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "repeats": 3}
    ratio = common.ratio("a", "b")({"a": [2.0, 6.0, 3.0], "b": [1.0, 2.0, 3.0]}, {})
    assert ratio == {"median": 2.0, "min": 1.0, "max": 3.0, "repeats": 3}
    assert common.cell(None) == "-"
    assert common.cell(ratio) == "2 (1-3)"
    assert common.cell([0.25, 1 / 3]) == "0.25 0.3333"
    assert common.cell("x" * 120) == "x" * 97 + "..."


def test_time_interleaved_samples_every_call():
    counts = {"a": 0, "b": 0}

    def make(name):
        def call():
            counts[name] += 1
            return jnp.zeros(())

        return call

    samples, numbers = common.time_interleaved(
        {"a": make("a"), "b": make("b")}, repeats=4, warmup=1, min_sample_s=0.0
    )
    assert {name: len(values) for name, values in samples.items()} == {"a": 4, "b": 4}
    assert all(v >= 0 for values in samples.values() for v in values)
    assert counts == {name: 1 + 3 + 4 * numbers[name] for name in counts}


def test_table_aligns_columns():
    text = common.table(["a", "long header"], [["xyz", 1]])
    header, rule, row = text.splitlines()
    assert header.index("long header") == row.index("1") == rule.index(" -") + 1


class FakeClock:
    """A clock that only a call advances: `cost(s)` is a call that lasts s seconds."""

    def __init__(self):
        self.now = 0.0
        self.calls = {}

    def __call__(self):
        return self.now

    def cost(self, name, seconds):
        self.calls[name] = 0

        def call():
            self.calls[name] += 1
            self.now += seconds

        return call


def test_run_measures_the_calls_of_a_figure_side_by_side(tmp_path, capsys):
    clock = FakeClock()
    fast, slow = clock.cost("fast", 1.0), clock.cost("slow", 3.0)
    figure = common.Figure(
        calls={"fast": fast, "slow": slow},
        rows=[
            {
                "call": "slow",
                "slow_ms": common.ms("slow"),
                "both_ms": common.ms(("fast", "slow")),
                "slow_over_fast": common.ratio("slow", "fast"),
                "calls_per_sample": common.calls_per_sample("fast"),
                "all_calls": common.calls_per_sample(("fast", "slow")),
            }
        ],
        goals=[
            common.goal("slow / fast at most", common.ratio("slow", "fast"), 3.5),
            common.goal("slow / fast at least", common.ratio("slow", "fast"), 3.5, at_most=False),
            common.goal("a number", 0.5, 0.0, at_most=False, note="given"),
        ],
    )
    out = tmp_path / "runs" / "b.json"
    args = argparse.Namespace(repeats=4, warmup=2, min_sample_s=2.5, out=str(out))
    benchmark = common.Benchmark("b", "a benchmark", lambda args: [figure], {"extra": 1}, "Fig")
    document = benchmark.run(args, clock=clock)

    assert json.loads(out.read_text()) == document
    assert list(document) == [
        "benchmark", "description", "created", "machine", "versions", "settings", "figures",
        "goals", "notes",
    ]  # fmt: skip
    assert document["settings"] == {"repeats": 4, "warmup": 2, "min_sample_s": 2.5, "extra": 1}
    # ceil(2.5 / 1) = 3 calls of the fast one per sample, ceil(2.5 / 3) = 1 of the slow one.
    assert clock.calls == {"fast": 2 + 3 + 4 * 3, "slow": 2 + 3 + 4 * 1}
    stat = {"median": 3.0, "min": 3.0, "max": 3.0, "repeats": 4}
    assert document["figures"] == [
        {
            "call": "slow",
            "slow_ms": {**stat, "median": 3000.0, "min": 3000.0, "max": 3000.0},
            "both_ms": {**stat, "median": 4000.0, "min": 4000.0, "max": 4000.0},
            "slow_over_fast": stat,
            "calls_per_sample": 3,
            "all_calls": {"fast": 3, "slow": 1},
        }
    ]
    assert [(g["goal"], g["value"], g["direction"], g["met"]) for g in document["goals"]] == [
        ("slow / fast at most", 3.0, "<=", True),
        ("slow / fast at least", 3.0, ">=", False),
        ("a number", 0.5, ">=", True),
    ]
    printed = capsys.readouterr().out
    assert "== Fig" in printed and "3000 (3000-3000)" in printed and "MISSED" in printed
    assert "all_calls" not in printed  # a dict of counts is in the JSON only


def test_run_lists_rows_table_by_table(tmp_path, capsys):
    stat = common.summary([2.0, 1.0, 4.0])
    figure = common.Figure(rows=[{"kind": "b", "t": stat}, {"kind": "a", "t": stat}])
    args = argparse.Namespace(repeats=3, steps=7, out=str(tmp_path / "c.json"))
    tables = {"A {steps}": lambda row: row["kind"] == "a", "B": lambda row: row["kind"] == "b"}
    document = common.Benchmark("c", "no calls", lambda args: [figure], {}, tables).run(args)
    assert stat == {"median": 2.0, "min": 1.0, "max": 4.0, "repeats": 3}
    assert document["figures"] == [{"kind": "a", "t": stat}, {"kind": "b", "t": stat}]
    assert document["settings"] == {"repeats": 3, "steps": 7} and document["goals"] == []
    assert "== A 7" in capsys.readouterr().out


@pytest.fixture(scope="module")
def libraries():
    # The peers are part of the `test` extra, so these tests always run.
    from experiments.bench import libraries

    return libraries


def test_aqt_intercept_runs_the_kdq_mlp_with_aqt_dense_ops(libraries):
    """The same MLP written with AQT's Dense op set by hand gives the same logits."""
    from aqt.jax.v2.flax import aqt_flax

    dense_config, _ = libraries.aqt_configs(8)
    op = functools.partial(aqt_flax.AqtDotGeneral, dense_config, prng_name=None)

    class HandMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64, dot_general_cls=op)(x.reshape((x.shape[0], -1))))
            return nn.Dense(10, dot_general_cls=op)(x)

    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1))
    params = create_model("mlp", num_classes=10).init(jax.random.PRNGKey(1), x)["params"]
    expected = HandMLP().apply({"params": params}, x)
    np.testing.assert_array_equal(libraries.forward("aqt", "mlp", 8)(params, x), expected)
    assert not np.allclose(expected, libraries.forward("aqt", "mlp", None)(params, x))


def test_aqt_intercept_reaches_the_cnn_convs(libraries):
    """AQT's quantized conv passes no gradient: with it, the CNN's conv kernels get none."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1))
    params = create_model("cnn", num_classes=10).init(jax.random.PRNGKey(1), x)["params"]
    forward = libraries.forward("aqt", "cnn", 8)
    grads = jax.jit(jax.grad(lambda p: forward(p, x).sum()))(params)
    assert {name: bool(np.any(g["kernel"])) for name, g in grads.items()} == {
        "Conv_0": False, "Conv_1": False, "Dense_0": True, "Dense_1": True,
    }  # fmt: skip


@pytest.mark.parametrize("library", ["kdq", "qwix", "aqt"])
def test_w8a8_is_close_to_float_with_per_tensor_activations(libraries, library):
    """Scaling up one example coarsens the others' activation grid: one range per tensor."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1))
    params = create_model("mlp", num_classes=10).init(jax.random.PRNGKey(1), x)["params"]
    forward = jax.jit(libraries.forward(library, "mlp", 8))
    reference = libraries.forward("kdq", "mlp", None)(params, x)
    logits = forward(params, x)
    np.testing.assert_allclose(logits, reference, atol=0.05)
    wide = forward(params, x.at[1:].multiply(100.0))
    assert not np.allclose(wide[0], logits[0], atol=1e-6)


def test_main_parses_the_options_a_benchmark_takes(tmp_path):
    seen = []
    benchmark = common.Benchmark(
        "d", "options", lambda args: seen.append(args) or [], {}, "T", repeats=4,
        options=("repeats", "steps"),
    )  # fmt: skip
    out = str(tmp_path / "d.json")
    assert benchmark.main(["--out", out, "--steps", "5"])["settings"] == {"repeats": 4, "steps": 5}
    assert benchmark.main(["--out", out], repeats=2)["settings"] == {"repeats": 2, "steps": 300}
    assert [vars(args) for args in seen][-1] == {"repeats": 2, "steps": 300, "out": out}
    with pytest.raises(SystemExit):
        benchmark.main(["--warmup", "1"])  # not an option of this benchmark
