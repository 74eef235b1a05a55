"""Second-moment statistics of Dense layers' inputs, streamed over calibration batches.

For the input rows x_r in R^K of a Dense layer (every row of every call:
tokens of every sequence, padding included), over the N calibration batches,

    gram      G = sum_r x_r x_r^T           (K, K)
    abs_sum   a = sum_r |x_r|               (K,)
    abs_max   m = max_r |x_r|               (K,)
    rows      n

accumulated in float64 on the host, batch by batch: memory is one set of
statistics per selected layer, whatever the number of batches. G / n is the
Hessian of the layer's squared output error (up to the factor 2 that GPTQ
writes), a / n the mean magnitude AWQ scales by, m the maximum SmoothQuant
migrates. With a rotation R for a layer (`rotation_signs`), the statistics
are those of the rotated rows x_r R, the input the rotated layer will see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdq.quant.intercept import module_path
from kdq.quant.rotation import rotate

COLLECTION = "kdq_input_statistics"


@dataclasses.dataclass
class InputStatistics:
    """The accumulated statistics of one layer's input (see the module docstring)."""

    gram: np.ndarray
    abs_sum: np.ndarray
    abs_max: np.ndarray
    rows: int

    @property
    def hessian(self) -> np.ndarray:
        """H = G / n, the mean of x x^T over the calibration rows."""
        return self.gram / max(self.rows, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        """mean_r |x_r|, per input channel."""
        return self.abs_sum / max(self.rows, 1)

    def add(self, other: InputStatistics) -> None:
        self.gram += other.gram
        self.abs_sum += other.abs_sum
        self.abs_max = np.maximum(self.abs_max, other.abs_max)
        self.rows += other.rows


def _sow_statistics(module: nn.Module, x: jax.Array, signs: Any) -> None:
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if signs is not None:
        rows = rotate(rows, signs)
    total = {"reduce_fn": lambda a, b: a + b, "init_fn": lambda: 0}
    module.sow(COLLECTION, "gram", rows.T @ rows, **total)
    module.sow(COLLECTION, "abs_sum", jnp.sum(jnp.abs(rows), axis=0), **total)
    module.sow(COLLECTION, "rows", jnp.int32(rows.shape[0]), **total)
    module.sow(
        COLLECTION,
        "abs_max",
        jnp.max(jnp.abs(rows), axis=0),
        reduce_fn=jnp.maximum,
        init_fn=lambda: 0.0,
    )


def statistics_interceptor(paths: set[str], rotations: dict[str, Any]):
    """An interceptor sowing the input statistics of the Dense layers at `paths`.

    Apply the model with mutable=[COLLECTION]; layers in `rotations` record
    the statistics of their rotated input.
    """

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense) and args:
            path = module_path(context.module)
            if path in paths:
                _sow_statistics(context.module, args[0], rotations.get(path))
        return next_fun(*args, **kwargs)

    return interceptor


def collect_input_statistics(
    apply: Callable[..., Any],
    batches: Iterable[Any],
    paths: set[str],
    *,
    rotations: dict[str, Any] | None = None,
) -> dict[str, InputStatistics]:
    """Streams `batches` through `apply` and accumulates the statistics of each layer in `paths`.

    Args:
      apply: `apply(x, mutable=[COLLECTION])` runs the model on a batch x and
        returns (output, collections), under whatever interceptors the caller
        set (quantized earlier layers, transforms); it is traced once by jit.
      batches: model inputs.
      paths: module paths of the Dense layers to measure.
      rotations: {path: rotation signs} for layers measured after rotation.

    Returns:
      {path: InputStatistics}.

    Raises:
      ValueError: no batch, a layer in `paths` never called, or an input that
        is not finite on some batch (names the layer and the batch).
    """
    rotations = rotations or {}

    @jax.jit
    def measure(x):
        with nn.intercept_methods(statistics_interceptor(paths, rotations)):
            _, state = apply(x, mutable=[COLLECTION])
        return state.get(COLLECTION, {})

    totals: dict[str, InputStatistics] = {}
    count = 0
    for index, x in enumerate(batches):
        count += 1
        flat = flax.traverse_util.flatten_dict(jax.device_get(measure(x)), sep="/")
        for path in paths:
            values = {name: flat.get(f"{path}/{name}") for name in ("gram", "abs_sum", "abs_max")}
            if any(v is None for v in values.values()):
                raise ValueError(
                    f"layer {path!r} was not called by the model on calibration batch {index}; "
                    "select layers the forward pass runs"
                )
            if not all(np.isfinite(v).all() for v in values.values()):
                raise ValueError(
                    f"the input of layer {path!r} is not finite (NaN or inf) on calibration "
                    f"batch {index}: calibration needs finite data; check that batch and the "
                    "model's variables"
                )
            stats = InputStatistics(
                gram=np.asarray(values["gram"], np.float64),
                abs_sum=np.asarray(values["abs_sum"], np.float64),
                abs_max=np.asarray(values["abs_max"], np.float64),
                rows=int(flat[f"{path}/rows"]),
            )
            if path in totals:
                totals[path].add(stats)
            else:
                totals[path] = stats
    if not count:
        raise ValueError("calibration needs at least one batch, got none")
    return totals
