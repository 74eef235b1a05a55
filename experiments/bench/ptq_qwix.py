"""Post-training quantization of a kdq language model with Qwix (0.1.8), as Qwix runs it.

`qwix_ptq(model, variables, calibration_batches, method=..., weight_bits=...,
group_size=..., act_bits=...)` quantizes the Dense projections inside the
decoder blocks of an unchanged Linen `kdq.models` model (the Qwix module
paths matching `LAYERS`, op "dot_general": q, k, v, o, gate, up and down of
every block) and returns a jitted `apply(tokens) -> logits` running Qwix's
quantized model. The embedding and a tied or untied output head stay float,
as in kdq's benchmark, which quantizes the `block_\\d+/.*` kernels;
attention's einsums, called by "block_i/attn" itself, match no rule.

Every method uses one rule (`qwix.QuantizationRule` or the method's contrib
rule) with module_path=LAYERS, op_names=("dot_general",),
weight_qtype=int<weight_bits> (jnp.int8 / jnp.int4, or Qwix's synthetic
"int2", "int3", "int5" .. "int7"), tile_size=group_size and act_qtype=int<act_bits>
or None. The abstract quantized params are `jax.eval_shape` of the init of
`qwix.quantize_model(model, qwix.PtqProvider(rules))`, as Qwix's examples do.

* "rtn": `qwix.quantize_params(params, abstract)`, run by `qwix.PtqProvider`.
* "gptq": statistics from `qwix.contrib.gptq.GptqCalibrationProvider` (one
  Linen apply per calibration batch with mutable "quant_stats": the mean over
  batches of H = X^T X of each layer's input rows X), weights from
  `gptq.quantize_params(..., gptq_block_size=128, gptq_damping_factor=damping)`
  (H += damping mean(diag H) I; columns in their natural order, no act order;
  group scales from the partially updated weights, as in the reference
  implementation), run by `qwix.PtqProvider`. Only int8 and int4: Qwix's GPTQ
  allocates its integers in the qtype itself, which a synthetic "int3" is not.
* "awq": statistics from `qwix.contrib.awq.AwqCalibrationProvider` (the mean
  over batches of a_k = mean_r |x_rk|), weights from `awq.quantize_params(...,
  n_grid=awq_grid)`, run by `awq.AwqInferenceProvider`: x @ (Q(diag(s) W) / s)
  with s = a^r / sqrt(max(a^r) min(a^r)) (a normalised to max 1, floored at
  1e-4), r in linspace(0, 1, awq_grid), the r minimising the
  activation-weighted weight error mean(((W - W_hat) a)^2), a diagonal
  stand-in for kdq's output error tr(dW^T H dW). Weight-only.
* "smoothquant": statistics from `qwix.contrib.smooth_quant.SqCalibrationProvider`
  with `SqRule(alpha=alpha)`: s_k = (m_k / B_a)^alpha / (w_k / B_w)^(1 - alpha),
  m_k = max_r |x_rk|, w_k = max_n |W_kn|, B the qtypes' bounds below (equal
  bounds and alpha = 0.5 give kdq's s_k = m_k^alpha / w_k^(1 - alpha)),
  clipped below at 1e-5; weights from `smooth_quant.quantize_params`
  (Q(diag(s) W)). Qwix's `SqInferenceProvider` multiplies the input by 1/s
  and then by the quantized weight without quantizing the input (W<b>A16);
  `SmoothQuantActQuant` quantizes the smoothed input as `qwix.PtqProvider`
  quantizes any input, so the model is W<b>A<a>. The statistics come from
  one apply on all calibration batches concatenated: Qwix averages the
  per-batch s and 1/s separately, and mean(s) mean(1/s) > 1 wherever s
  differs between batches, which would change the float function; one pass
  keeps x (1/s) diag(s) W = x W and takes m_k over all calibration rows.

All statistics come from the float model in one pass; kdq's layerwise PTQ
calibrates each layer on the outputs of the already quantized layers before it.

Qwix's numerics against kdq's QuantSpec(bits=b, axes=(-1,)):

* Weights: symmetric, one absmax scale per output channel, or per output
  channel and group of `group_size` consecutive input rows with tile_size
  (kdq's group_size layout); round half to even; no clipping search. But the
  scale is s = max|w| / (qmax + 1/2) (Qwix's symmetric bound: 127.5 for int8,
  7.5 for int4, 3.5 for int3) where kdq's is max|w| / qmax, so each group's
  extreme sits on a rounding tie at qmax + 1/2 steps: the positive one
  saturates to qmax, the negative one takes -qmax - 1 or -qmax as float32
  rounding decides (XLA evaluates w / s as w * fl(1/s)). kdq's levels stay in
  [-qmax, qmax]; given Qwix's scale, kdq's `fake_quant` agrees with Qwix's
  weights everywhere but at those ties.
* Activations (act_bits): dynamic, recomputed on every call, one absmax scale
  per token (every axis but the contraction axis keeps its own scale; with
  tile_size also per group of `group_size` input channels), with the same
  qmax + 1/2 bound (kdq's per-token spec, QuantSpec(axes=(0, 1)) on (B, T, K)
  inputs, uses qmax).
  Qwix's PTQ provider has no per-tensor switch.
* Weight-only layers dequantize the weight and multiply in float; with
  quantized activations and no tile under 128 input rows Qwix multiplies the
  integers (int32 accumulation) and rescales the output, else it dequantizes
  both operands first.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from qwix.contrib import awq, gptq
from qwix.contrib import smooth_quant as sq

METHODS = ("rtn", "gptq", "awq", "smoothquant")
BITS = range(2, 9)
GPTQ_BITS = (4, 8)
LAYERS = r"block_\d+/.*"
GPTQ_BLOCK_SIZE = 128


class SmoothQuantActQuant(sq.SqInferenceProvider):
    """Qwix's SmoothQuant inference with Qwix's PTQ quantization of the smoothed input.

    For a smoothed weight (a `WithSqScale` holding Q(diag(s) W) and 1/s) the
    layer computes Q_a(x (1/s)) @ Q(diag(s) W) by `qwix.PtqProvider.dot_general`,
    which quantizes its input by the rule's act_qtype (dynamic, per token).
    """

    def dot_general(
        self,
        lhs: jax.Array,
        rhs: Any,
        dimension_numbers: jax.lax.DotDimensionNumbers,
        precision: jax.lax.PrecisionLike = None,
        preferred_element_type: jax.typing.DTypeLike | None = None,
        *,
        out_sharding: Any = None,
    ) -> jax.Array:
        """lhs @ rhs, lhs divided by the smoothing scales of `rhs` before it is quantized."""
        if isinstance(rhs, sq.WithSqScale):
            lhs = self._apply_sq_scale(lhs, rhs.inv_sq_scale)
        return qwix.PtqProvider.dot_general(
            self,
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )


@dataclasses.dataclass(frozen=True)
class _Route:
    """How Qwix runs one method: its rule, calibration, weight quantization and inference."""

    rule: type
    calibrator: type | None
    quantize: Callable[..., Any]  # (params, abstract, stats, options) -> quantized params
    provider: type
    entry_points: tuple[str, ...]


ROUTES = {
    "rtn": _Route(
        qwix.QuantizationRule,
        None,
        lambda params, abstract, stats, o: qwix.quantize_params(params, abstract),
        qwix.PtqProvider,
        ("qwix.quantize_params", "qwix.PtqProvider"),
    ),
    "gptq": _Route(
        gptq.GptqRule,
        gptq.GptqCalibrationProvider,
        lambda params, abstract, stats, o: gptq.quantize_params(
            params,
            abstract,
            stats,
            gptq_block_size=GPTQ_BLOCK_SIZE,
            gptq_damping_factor=o["gptq_damping"],
        ),
        qwix.PtqProvider,
        (
            "qwix.contrib.gptq.GptqCalibrationProvider",
            "qwix.contrib.gptq.quantize_params",
            "qwix.PtqProvider",
        ),
    ),
    "awq": _Route(
        awq.AwqRule,
        awq.AwqCalibrationProvider,
        lambda params, abstract, stats, o: awq.quantize_params(
            params, abstract, stats, n_grid=o["awq_grid"]
        ),
        awq.AwqInferenceProvider,
        (
            "qwix.contrib.awq.AwqCalibrationProvider",
            "qwix.contrib.awq.quantize_params",
            "qwix.contrib.awq.AwqInferenceProvider",
        ),
    ),
    "smoothquant": _Route(
        sq.SqRule,
        sq.SqCalibrationProvider,
        lambda params, abstract, stats, o: sq.quantize_params(params, abstract, stats),
        SmoothQuantActQuant,
        (
            "qwix.contrib.smooth_quant.SqCalibrationProvider",
            "qwix.contrib.smooth_quant.quantize_params",
            "qwix.contrib.smooth_quant.SqInferenceProvider + qwix.PtqProvider.dot_general",
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class QwixPTQResult:
    """A model quantized by Qwix.

    Attributes:
      apply: jitted tokens (B, T) int -> logits (B, T, V) of the quantized
        model, run by Qwix's inference provider (compiled on the first call).
      calibration_s: statistics_s + quantize_compile_s + quantize_run_s.
      statistics_s: wall seconds of the calibration passes, their jit
        compilation included (0 for "rtn").
      quantize_compile_s: wall seconds from building the PTQ model to the
        compiled weight quantization: the abstract params (`jax.eval_shape`
        of its init) and the jit compilation of `quantize_params`.
      quantize_run_s: wall seconds of the compiled `quantize_params` call
        until the quantized params are on the device.
      params: the quantized params the provider runs (`WithAux` leaves holding
        Qwix `QArray`s for the quantized kernels, float arrays elsewhere).
      inference: `model` intercepted by Qwix's inference provider;
        `apply(tokens)` is jit of inference.apply({"params": params}, tokens).
      quantized_layers: module paths of the quantized kernels, sorted.
      entry_points: the Qwix calls made.
      config: the rule and the options, as JSON values.
    """

    apply: Callable[[jax.Array], jax.Array]
    calibration_s: float
    statistics_s: float
    quantize_compile_s: float
    quantize_run_s: float
    params: Any
    inference: nn.Module
    quantized_layers: tuple[str, ...]
    entry_points: tuple[str, ...]
    config: dict[str, Any]


def qwix_qtype(bits: int) -> jax.typing.DTypeLike:
    """Qwix's qtype of signed `bits`-bit integers: jnp.int8, jnp.int4 or "int<bits>"."""
    return {8: jnp.int8, 4: jnp.int4}.get(bits, f"int{bits}")


def _qtype_name(qtype: jax.typing.DTypeLike | None) -> str | None:
    return qtype if qtype is None or isinstance(qtype, str) else jnp.dtype(qtype).name


def _check_bits(name: str, bits: Any, *, optional: bool) -> None:
    if bits is None and optional:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        allowed = "None or " if optional else ""
        raise ValueError(
            f"{name} must be {allowed}an int in {BITS.start}..{BITS.stop - 1} "
            f"(Qwix's signed integer qtypes), got {name}={bits!r}"
        )


def _check_method(method: Any, weight_bits: int, act_bits: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "smoothquant" and act_bits is None:
        raise ValueError(
            "smoothquant needs act_bits (its scales balance activation and weight ranges); "
            "pass act_bits=8, or use method='awq' or 'rtn' for weight-only quantization"
        )
    if method == "awq" and act_bits is not None:
        raise ValueError(
            "awq is weight-only in Qwix: AwqInferenceProvider hands the dequantized weight "
            "to the PTQ provider, which would quantize it again as an activation; "
            "pass act_bits=None"
        )
    if method == "gptq" and weight_bits not in GPTQ_BITS:
        raise ValueError(
            f"Qwix's GPTQ supports weight_bits in {GPTQ_BITS} (it stores its integers in the "
            f"qtype itself, and int{weight_bits} is a synthetic Qwix qtype), got "
            f"weight_bits={weight_bits}; use rtn or awq for other widths"
        )


def _check_batches(batches: Any) -> None:
    if not isinstance(batches, Sequence) or not batches:
        raise ValueError(
            "calibration_batches must be a non-empty list of int token arrays (B, T); "
            "pass at least one batch (rtn takes only its shape)"
        )
    for i, batch in enumerate(batches):
        shape, dtype = getattr(batch, "shape", None), getattr(batch, "dtype", None)
        if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(
                f"calibration_batches[{i}] must be an int token array (B, T), got "
                f"shape={shape} dtype={dtype}"
            )


def _check_group_size(params: Any, group_size: Any) -> None:
    """Raises ValueError unless group_size is None or divides every block kernel's input size."""
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
    for path, kernel in flax.traverse_util.flatten_dict(params, sep="/").items():
        module, _, name = path.rpartition("/")
        if name == "kernel" and re.fullmatch(LAYERS, module) and kernel.shape[0] % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the {kernel.shape[0]} input rows of "
                f"{path}; pick a divisor of every block kernel's input size"
            )


def _statistics(model: nn.Module, provider: Any, variables: dict, batches: Sequence) -> Any:
    """The "quant_stats" collection of `provider` after one jitted apply per batch."""
    calibrating = qwix.quantize_model(model, provider)
    step = jax.jit(lambda v, x: calibrating.apply(v, x, mutable="quant_stats")[1]["quant_stats"])
    collected = dict(variables)
    for batch in batches:
        collected["quant_stats"] = step(collected, batch)
    return jax.block_until_ready(collected["quant_stats"])


def _quantized_layers(params: Any) -> tuple[str, ...]:
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return tuple(
        sorted(path.rpartition("/")[0] for path, v in flat.items() if not isinstance(v, jax.Array))
    )


def _config(method: str, rule: Any, act_bits: int | None, options: dict, passes: int) -> dict:
    options = {
        "rtn": {},
        "gptq": {"gptq_block_size": GPTQ_BLOCK_SIZE, "gptq_damping": options["gptq_damping"]},
        "awq": {"awq_grid": options["awq_grid"]},
        "smoothquant": {"alpha": options["alpha"]},
    }[method]
    return {
        "method": method,
        "rule": type(rule).__name__,
        "module_path": rule.module_path,
        "op_names": list(rule.op_names),
        "weight_qtype": _qtype_name(rule.weight_qtype),
        "act_qtype": _qtype_name(rule.act_qtype),
        "tile_size": rule.tile_size,
        "weight_calibration": f"{rule.weight_calibration_method}, scale = absmax / (qmax + 0.5)",
        "act_calibration": None if act_bits is None else "absmax, dynamic, per token",
        "calibration_passes": passes,
        **options,
    }


def qwix_ptq(
    model: nn.Module,
    variables: dict[str, Any],
    calibration_batches: Sequence[jax.Array],
    *,
    method: str,
    weight_bits: int,
    group_size: int | None,
    act_bits: int | None,
    alpha: float = 0.5,
    gptq_damping: float = 0.01,
    awq_grid: int = 20,
) -> QwixPTQResult:
    """Quantizes the block Dense layers of `model` with Qwix's `method` (module docstring).

    Args:
      model: a Linen model of int tokens (B, T), e.g. a `kdq.models.TransformerLM`.
      variables: its float variables ({"params": ...}).
      calibration_batches: int token arrays (B, T) ("smoothquant" concatenates
        them, so they need one length T; "rtn" takes only the first's shape).
      method: "rtn", "gptq", "awq" or "smoothquant".
      weight_bits: signed integer width of the weights, 2..8 (gptq: 4 or 8).
      group_size: Qwix's tile size along the contraction axis: one scale per
        output channel and group of this many input rows; None: per channel.
      act_bits: signed integer width of the layers' inputs (dynamic, per
        token), or None for weight-only.
      alpha: SmoothQuant's migration strength.
      gptq_damping: GPTQ's damping, relative to mean(diag(H)).
      awq_grid: AWQ's number of exponents, linspace(0, 1, awq_grid).

    Returns:
      The `QwixPTQResult`.

    Raises:
      ValueError: an unknown method, bits outside 2..8 (gptq: not 4 or 8), a
        group size that does not divide a block kernel's input size,
        smoothquant without act_bits, awq with act_bits, or calibration
        batches that are not int (B, T) arrays.
    """
    _check_bits("weight_bits", weight_bits, optional=False)
    _check_bits("act_bits", act_bits, optional=True)
    _check_method(method, weight_bits, act_bits)
    _check_batches(calibration_batches)
    _check_group_size(variables["params"], group_size)
    route, options = ROUTES[method], dict(alpha=alpha, gptq_damping=gptq_damping, awq_grid=awq_grid)
    extra = {"alpha": alpha} if method == "smoothquant" else {}
    extra |= {"n_grid": awq_grid} if method == "awq" else {}
    rule = route.rule(
        module_path=LAYERS,
        op_names=("dot_general",),
        weight_qtype=qwix_qtype(weight_bits),
        act_qtype=None if act_bits is None else qwix_qtype(act_bits),
        tile_size=group_size,
        **extra,
    )
    batches = list(calibration_batches)
    if method == "smoothquant":
        batches = [jnp.concatenate(batches, axis=0)]
    start = time.perf_counter()
    stats = None
    if route.calibrator is not None:
        stats = _statistics(model, route.calibrator([rule]), variables, batches)
    statistics_s = time.perf_counter() - start

    start = time.perf_counter()
    ptq_model = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    example = calibration_batches[0]
    abstract = jax.eval_shape(ptq_model.init, jax.random.PRNGKey(0), example)["params"]
    quantize = functools.partial(route.quantize, abstract=abstract, o=options)
    compiled = jax.jit(quantize).lower(variables["params"], stats=stats).compile()
    quantize_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    params = jax.block_until_ready(compiled(variables["params"], stats=stats))
    quantize_run_s = time.perf_counter() - start

    inference = qwix.quantize_model(model, route.provider([rule]))
    others = {k: v for k, v in variables.items() if k not in ("params", "quant_stats")}
    run = jax.jit(lambda p, tokens: inference.apply({**others, "params": p}, tokens))
    return QwixPTQResult(
        apply=functools.partial(run, params),
        calibration_s=statistics_s + quantize_compile_s + quantize_run_s,
        statistics_s=statistics_s,
        quantize_compile_s=quantize_compile_s,
        quantize_run_s=quantize_run_s,
        params=params,
        inference=inference,
        quantized_layers=_quantized_layers(params),
        entry_points=("qwix.quantize_model", "qwix.PtqProvider (abstract params)")
        + route.entry_points,
        config=_config(method, rule, act_bits, options, 0 if stats is None else len(batches)),
    )
