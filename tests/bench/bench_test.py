"""The benchmark harness: statistics, timing, and how the peers are applied."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import common
from kdq.models import create_model


def test_summary_and_paired_ratio():
    assert common.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "repeats": 3}
    ratio = common.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])
    assert ratio == {"median": 2.0, "min": 1.0, "max": 3.0, "repeats": 3}
    assert common.fmt(None) == "-"
    assert common.fmt(ratio, 1) == "2.0 (1.0-3.0)"


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


def test_goal_direction():
    assert common.goal("g", 1.2, 1.3, at_most=True)["met"] is True
    assert common.goal("g", 1.2, 1.3, at_most=False)["met"] is False
    assert common.goal("g", None, 1.3, at_most=True)["met"] is None


def test_table_aligns_columns():
    text = common.table(["a", "long header"], [["xyz", 1]])
    header, rule, row = text.splitlines()
    assert header.index("long header") == row.index("1") == rule.index(" -") + 1


@pytest.fixture(scope="module")
def libraries():
    # The peers are part of the `test` extra, so these tests always run.
    from experiments.bench import libraries

    return libraries


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_aqt_restatement_is_the_kdq_model(libraries, name):
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1))
    params = create_model(name, num_classes=10).init(jax.random.PRNGKey(1), x)["params"]
    expected = libraries.forward("kdq", name, None, x)(params, x)
    np.testing.assert_array_equal(libraries.forward("aqt", name, None, x)(params, x), expected)


@pytest.mark.parametrize("library", ["kdq", "qwix", "aqt"])
def test_w8a8_is_close_to_float_with_per_tensor_activations(libraries, library):
    """Scaling up one example coarsens the others' activation grid: one range per tensor."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1))
    params = create_model("mlp", num_classes=10).init(jax.random.PRNGKey(1), x)["params"]
    forward = jax.jit(libraries.forward(library, "mlp", 8, x))
    reference = libraries.forward("kdq", "mlp", None, x)(params, x)
    logits = forward(params, x)
    np.testing.assert_allclose(logits, reference, atol=0.05)
    wide = forward(params, x.at[1:].multiply(100.0))
    assert not np.allclose(wide[0], logits[0], atol=1e-6)
