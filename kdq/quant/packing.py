"""Dense bit packing of b-bit integers (1 <= b <= 16), for storage on disk.

`pack_bits(values, bits)` writes value i of the flattened array to bits
[i*b, (i+1)*b) of a little-endian bit stream: bit k of the stream is bit
k mod 8 of byte k // 8, and the value's least significant bit comes first.
A signed value is stored as its b-bit two's complement (v mod 2^b). The
stream is zero-padded to whole bytes, so n values take ceil(n*b / 8) bytes:
1-bit values eight per byte, 2-bit four per byte, 3-bit eight per three
bytes, 4-bit two per byte (value 2j in the low nibble of byte j, 2j+1 in
the high nibble), 8- and 16-bit values one and two bytes each.
"""

from __future__ import annotations

import math

import numpy as np


def packed_size(size: int, bits: int) -> int:
    """Bytes taken by `size` values packed at `bits` bits: ceil(size * bits / 8)."""
    return math.ceil(size * bits / 8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got bits={bits!r}")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs integers that fit in `bits` bits into a flat uint8 array.

    Args:
      values: integers in [-2^(bits-1), 2^bits - 1] (signed values in
        [-2^(bits-1), 2^(bits-1) - 1], unsigned ones in [0, 2^bits - 1]),
        any shape and integer dtype.
      bits: the width, 1..16.

    Returns:
      uint8 array of `packed_size(values.size, bits)` bytes (module docstring).

    Raises:
      ValueError: `bits` is out of range or a value does not fit in it.
    """
    _check_bits(bits)
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -(2 ** (bits - 1)) or flat.max() > 2**bits - 1):
        raise ValueError(
            f"values must fit in {bits} bits, got the range [{flat.min()}, {flat.max()}]"
        )
    codes = (flat & (2**bits - 1)).astype(np.uint16)
    if bits in (8, 16):
        return codes.astype(f"<u{bits // 8}").view(np.uint8).copy()
    if 8 % bits == 0:  # 1, 2, 4: whole values per byte
        per_byte = 8 // bits
        codes = np.pad(codes, (0, -codes.size % per_byte)).reshape(-1, per_byte)
        shifts = np.arange(per_byte, dtype=np.uint16) * bits
        return np.bitwise_or.reduce(codes << shifts, axis=1).astype(np.uint8)
    stream = (codes[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(stream.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(
    packed: np.ndarray, shape: tuple[int, ...], bits: int, *, signed: bool
) -> np.ndarray:
    """Inverse of `pack_bits`: the int64 array of `shape`.

    Args:
      packed: bytes from `pack_bits`.
      shape: the shape of the packed values.
      bits: their width, 1..16.
      signed: read each value as b-bit two's complement (else unsigned).

    Returns:
      The values, as int64 (cast them to the storage dtype).

    Raises:
      ValueError: `packed` has not exactly `packed_size(prod(shape), bits)` bytes.
    """
    _check_bits(bits)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    size = math.prod(shape)
    if packed.size != packed_size(size, bits):
        raise ValueError(
            f"{packed.size} packed bytes cannot hold {size} values of {bits} bits "
            f"(that takes {packed_size(size, bits)} bytes)"
        )
    if bits in (8, 16):
        codes = packed.view(f"<u{bits // 8}").astype(np.int64)
    elif 8 % bits == 0:
        shifts = np.arange(8 // bits, dtype=np.uint8) * bits
        codes = ((packed[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:size].astype(np.int64)
    else:
        stream = np.unpackbits(packed, count=size * bits, bitorder="little").reshape(size, bits)
        codes = (stream.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)
    if signed:
        codes = np.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
    return codes.reshape(shape)
