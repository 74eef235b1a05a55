"""The throughput benchmark builds the same step as training, for any config."""

import jax
import numpy as np
import pytest

from experiments import bench_throughput
from experiments.configs import digits_prune_2of4_w4_kd, digits_qat_w4a4_kd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("module", [digits_qat_w4a4_kd, digits_prune_2of4_w4_kd])
def test_one_benchmarked_step_trains(module):
    step, state, teacher_variables, batch = bench_throughput.build(module.get_config(), 16)
    params_before = jax.tree_util.tree_map(np.array, state.params)
    for _ in range(2):  # the learning rate warms up from 0 at step 0
        state, metrics = step(state, teacher_variables, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2
    changed = jax.tree_util.tree_map(
        lambda a, b: not np.array_equal(a, b), params_before, state.params
    )
    assert any(jax.tree_util.tree_leaves(changed))
