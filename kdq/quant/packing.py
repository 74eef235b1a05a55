"""Bit packing of 4-bit integers: two values per byte, for storage on disk.

Value i of the flattened array goes to the low nibble of byte i // 2 when i
is even and to the high nibble when i is odd; an odd count is padded with 0.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Packs an int4 or uint4 array into a flat uint8 array of ceil(size / 2) bytes."""
    nibbles = np.asarray(values).astype(np.int8).reshape(-1).view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...], *, signed: bool) -> np.ndarray:
    """Inverse of `pack_int4`: the int4 (signed) or uint4 array of `shape`."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    nibbles = np.empty(packed.size * 2, np.int16)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    values = nibbles[: int(np.prod(shape, dtype=np.int64))]
    if signed:
        values = np.where(values >= 8, values - 16, values)
    return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4).reshape(shape)
