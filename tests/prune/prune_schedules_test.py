"""kdq.prune schedules against the numpy formula of Zhu & Gupta (2017) in `reference.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.prune import (
    SparsitySchedule,
    constant_schedule,
    one_shot_schedule,
    polynomial_schedule,
    polynomial_sparsity,
)

from . import reference as ref

STEPS = np.arange(0, 201)


@pytest.mark.parametrize("initial,final,power", [(0.0, 0.8, 3), (0.2, 0.9, 3), (0.1, 0.5, 1.5)])
def test_polynomial_matches_formula_at_every_step(initial, final, power):
    kwargs = dict(initial=initial, final=final, begin=10, end=110, frequency=10, power=power)
    values = np.asarray(jax.jit(jax.vmap(lambda t: polynomial_sparsity(t, **kwargs)))(STEPS))
    expected = np.array([ref.polynomial(int(t), **kwargs) for t in STEPS])
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6)
    assert np.all(values[:10] == np.float32(initial))
    assert np.all(values[110:] == np.float32(final))
    # piecewise constant between update steps, strictly increasing across them
    for t in range(10, 110, 10):
        assert np.all(values[t : t + 10] == values[t])
        assert values[t + 10] > values[t]


def test_update_steps():
    schedule = polynomial_schedule(initial=0.0, final=0.8, begin=10, end=110, frequency=10)
    expected = {10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110}
    traced = np.asarray(jax.jit(jax.vmap(schedule.is_update_step))(STEPS))
    np.testing.assert_array_equal(np.flatnonzero(traced), sorted(expected))
    assert {int(t) for t in STEPS if schedule.should_update(int(t))} == expected


def test_frequency_one_updates_every_step_in_range():
    schedule = polynomial_schedule(initial=0.0, final=0.5, begin=3, end=7, power=2)
    assert [t for t in range(12) if schedule.should_update(t)] == [3, 4, 5, 6, 7]
    values = [float(schedule(t)) for t in range(12)]
    expected = [ref.polynomial(t, 0.0, 0.5, 3, 7, 1, power=2) for t in range(12)]
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_one_shot_and_constant():
    one_shot = one_shot_schedule(0.7, begin=25)
    values = np.asarray(jax.vmap(one_shot)(STEPS))
    np.testing.assert_array_equal(values, np.where(STEPS < 25, 0.0, np.float32(0.7)))
    assert [t for t in STEPS if one_shot.should_update(int(t))] == [25]

    constant = constant_schedule(0.4, begin=5, end=45, frequency=20)
    np.testing.assert_array_equal(np.asarray(jax.vmap(constant)(STEPS)), np.float32(0.4))
    assert [t for t in STEPS if constant.should_update(int(t))] == [5, 25, 45]
    assert [t for t in STEPS if constant_schedule(0.4).should_update(int(t))] == [0]


def test_schedule_is_hashable_and_static_under_jit():
    schedule = polynomial_schedule(initial=0.0, final=0.5, begin=0, end=4)
    assert hash(schedule) == hash(polynomial_schedule(initial=0.0, final=0.5, begin=0, end=4))
    f = jax.jit(lambda s, t: s(t), static_argnums=0)
    assert float(f(schedule, jnp.int32(4))) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"end": 10}, r"end must be > begin for a gradual schedule, got begin=10, end=10"),
        ({"end": 5}, r"end must be > begin for a gradual schedule, got begin=10, end=5"),
        ({"final": 0.1, "initial": 0.3}, r"final must be >= initial, got initial=0.3, final=0.1"),
        ({"frequency": 0}, r"frequency must be an int >= 1, got frequency=0"),
        ({"final": 1.0}, r"final must be a number in \[0, 1\), got final=1.0"),
        ({"initial": -0.1}, r"initial must be a number in \[0, 1\), got initial=-0.1"),
        ({"frequency": 7}, r"end - begin must be a multiple of frequency, got begin=10, end=110"),
        ({"power": 0}, r"power must be a number > 0, got power=0"),
        ({"begin": -1}, r"begin must be an int >= 0, got begin=-1"),
    ],
)
def test_bad_schedule_is_rejected(kwargs, match):
    args = dict(initial=0.0, final=0.8, begin=10, end=110, frequency=10) | kwargs
    with pytest.raises(ValueError, match=match):
        polynomial_schedule(**args)
    with pytest.raises(ValueError, match=match):
        polynomial_sparsity(0, **args)


def test_bad_one_shot_and_constant_are_rejected():
    with pytest.raises(
        ValueError, match=r"sparsity must be a number in \[0, 1\), got sparsity=1.0"
    ):
        one_shot_schedule(1.0)
    with pytest.raises(ValueError, match=r"end must be >= begin, got begin=10, end=5"):
        constant_schedule(0.5, begin=10, end=5)
    with pytest.raises(ValueError, match=r"step must be an int >= 0, got step=-3"):
        SparsitySchedule(final=0.5, end=0).should_update(-3)
