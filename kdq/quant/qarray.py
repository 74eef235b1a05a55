"""`QArray`: an integer tensor with its scale and zero point, as a pytree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from kdq.quant.packing import packed_size
from kdq.quant.spec import QuantSpec


@struct.dataclass
class QArray:
    """A quantized array: x ~= (qvalue - zero_point) * scale.

    `qvalue`, `scale` and `zero_point` are pytree leaves (they move through
    `jit`, `tree_map` and checkpoints); `spec` is static metadata.

    Attributes:
      qvalue: integers of dtype `spec.dtype`, shape of the original array.
      scale: float32, same rank as `qvalue`; size 1 on reduced axes, the full
        size on kept axes, and size/group_size on a grouped axis.
      zero_point: integers of dtype `spec.dtype`, shape of `scale`, or None for
        a symmetric quantizer.
      spec: the `QuantSpec` that produced it.
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    spec: QuantSpec = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qvalue.shape)

    @property
    def nbytes(self) -> int:
        """Bytes needed to store the array with its integers densely bit-packed.

        The integers (`qvalue`, and `zero_point` when affine) count `spec.bits`
        bits each, whatever their in-memory container (2-bit values live in
        int4 arrays): n values take ceil(n * bits / 8) bytes, as
        `kdq.quant.packing.pack_bits` stores them. The float scales count
        their itemsize.
        """
        total = packed_size(math.prod(self.qvalue.shape), self.spec.bits)
        total += math.prod(self.scale.shape) * jnp.dtype(self.scale.dtype).itemsize
        if self.zero_point is not None:
            total += packed_size(math.prod(self.zero_point.shape), self.spec.bits)
        return total
