"""`QArray`: an integer tensor with its scale and zero point, as a pytree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

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
        """Bytes needed to store the array with integers bit-packed.

        (u)int4 values count half a byte each, whatever the in-memory layout.
        """
        return sum(_packed_nbytes(leaf) for leaf in (self.qvalue, self.scale, self.zero_point))


def _packed_nbytes(leaf: jax.Array | None) -> int:
    if leaf is None:
        return 0
    dtype = jnp.dtype(leaf.dtype)
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8
    return math.ceil(math.prod(leaf.shape) * bits / 8)
