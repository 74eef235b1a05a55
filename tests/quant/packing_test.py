"""Dense bit packing against a reference built from Python integers."""

from __future__ import annotations

import numpy as np
import pytest

from kdq.quant.packing import pack_bits, packed_size, unpack_bits


def _reference_bytes(values: np.ndarray, bits: int) -> np.ndarray:
    """The little-endian bit stream of the b-bit two's complement codes, as one big integer."""
    stream = 0
    for i, v in enumerate(values.reshape(-1).tolist()):
        stream |= (v % 2**bits) << (i * bits)
    n_bytes = -(-values.size * bits // 8)
    return np.frombuffer(stream.to_bytes(n_bytes, "little"), np.uint8)


def _values(bits, signed, shape, seed):
    rng = np.random.default_rng(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = rng.integers(lo, hi, size=int(np.prod(shape)), endpoint=True)
    ends = [lo, hi][: values.size]  # both ends of the range
    values[: len(ends)] = ends
    return values.reshape(shape)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 12, 16])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 11)])
def test_pack_matches_the_reference_stream_and_round_trips(bits, signed, shape):
    values = _values(bits, signed, shape, seed=bits)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(values.size, bits)
    assert packed.size == -(-values.size * bits // 8)
    np.testing.assert_array_equal(packed, _reference_bytes(values, bits))
    np.testing.assert_array_equal(unpack_bits(packed, shape, bits, signed=signed), values)


def test_densities_of_the_narrow_widths():
    assert pack_bits(np.ones(16, np.int8), 1).size == 2  # eight per byte
    assert pack_bits(np.ones(16, np.int8), 2).size == 4  # four per byte
    assert pack_bits(np.ones(16, np.int8), 3).size == 6  # eight in three bytes
    assert pack_bits(np.ones(16, np.int8), 4).size == 8  # two per byte


def test_known_layouts():
    # 2-bit: value i in bits 2i..2i+1 of the byte, signed as two's complement.
    np.testing.assert_array_equal(pack_bits(np.array([1, -1, 0, -2]), 2), [0b10_00_11_01])
    # 4-bit: value 2j in the low nibble, 2j+1 in the high nibble; odd count padded.
    np.testing.assert_array_equal(pack_bits(np.array([-8, 7, 3]), 4), [0x78, 0x03])
    # 3-bit: 8 values in 3 bytes.
    np.testing.assert_array_equal(
        pack_bits(np.arange(8), 3), np.frombuffer((0o76543210).to_bytes(3, "little"), np.uint8)
    )
    np.testing.assert_array_equal(
        unpack_bits(np.array([0b1111], np.uint8), (4,), 1, signed=True), [-1, -1, -1, -1]
    )


def test_empty_arrays():
    assert pack_bits(np.zeros(0, np.int8), 3).size == 0
    assert unpack_bits(np.zeros(0, np.uint8), (0, 4), 3, signed=True).shape == (0, 4)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"values must fit in 2 bits, got the range \[-3, 1\]"):
        pack_bits(np.array([-3, 1]), 2)
    with pytest.raises(ValueError, match=r"values must fit in 3 bits.*\[0, 8\]"):
        pack_bits(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match="bits must be an integer in 1..16, got bits=0"):
        pack_bits(np.array([0]), 0)
    with pytest.raises(ValueError, match="5 packed bytes cannot hold 16 values of 2 bits"):
        unpack_bits(np.zeros(5, np.uint8), (16,), 2, signed=False)
