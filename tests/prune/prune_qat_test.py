"""Sparsity-preserving quantization: a pruned weight stays exactly zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.quant import QuantSpec, fake_quant, lsq_fake_quant, quantize


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, axes=(-1,)),
        QuantSpec(bits=4, axes=(-1,), symmetric=False),
        QuantSpec(bits=3, signed=False, symmetric=False),
        QuantSpec(bits=8, calibration="mse"),
    ],
    ids=["sym", "affine", "affine-unsigned", "mse"],
)
def test_fake_quant_keeps_zeros_exactly(spec):
    w = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    w[np.random.default_rng(1).uniform(size=w.shape) < 0.5] = 0.0
    out = np.asarray(jax.jit(lambda w: fake_quant(w, spec))(w))
    assert np.all(out[w == 0] == 0.0)
    q = quantize(w, spec)
    zero_point = (
        0 if q.zero_point is None else np.broadcast_to(np.asarray(q.zero_point, np.int32), w.shape)
    )
    np.testing.assert_array_equal(
        np.asarray(q.qvalue, np.int32)[w == 0], np.broadcast_to(zero_point, w.shape)[w == 0]
    )


def test_lsq_keeps_zeros_exactly():
    w = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    w[:, ::2] = 0.0
    out = np.asarray(lsq_fake_quant(w, jnp.full((1, 16), 0.1), QuantSpec(bits=2)))
    assert np.all(out[:, ::2] == 0.0)
