"""Storage accounting of QArray."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kdq.quant import QuantSpec
from kdq.quant import quantize as _quantize

quantize = jax.jit(_quantize, static_argnames="spec")

SCALE_BYTES = 4  # float32


@pytest.mark.parametrize("shape", [(16, 6), (3, 5)])
def test_int4_values_take_half_the_bytes_of_int8(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    q4 = quantize(x, QuantSpec(bits=4, axes=(-1,)))
    q8 = quantize(x, QuantSpec(bits=8, axes=(-1,)))
    n, channels = x.size, shape[-1]
    assert q4.qvalue.dtype.name == "int4" and q8.qvalue.dtype.name == "int8"
    scale_bytes = channels * SCALE_BYTES
    assert q8.nbytes == n + scale_bytes
    assert q4.nbytes == -(-n // 2) + scale_bytes  # half a byte per value, rounded up
    if n % 2 == 0:
        assert 2 * (q4.nbytes - scale_bytes) == q8.nbytes - scale_bytes


def test_nbytes_counts_zero_points_and_wider_types():
    x = np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)
    # per-tensor: one scale, one zero point
    affine3 = quantize(x, QuantSpec(bits=3, signed=False, symmetric=False))
    # 96 values at 3 bits packed densely (36 bytes); one 3-bit zero point -> 1 byte
    assert affine3.nbytes == 96 * 3 // 8 + SCALE_BYTES + 1
    affine8 = quantize(x, QuantSpec(bits=8, symmetric=False, axes=(-1,)))
    assert affine8.nbytes == 96 + 6 * SCALE_BYTES + 6
    q16 = quantize(x, QuantSpec(bits=16, axes=(0,), group_size=2))
    assert q16.scale.shape == (16, 3)
    assert q16.nbytes == 96 * 2 + 48 * SCALE_BYTES
    assert x.nbytes == 96 * 4
