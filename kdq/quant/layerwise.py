"""Layer-by-layer post-training quantization: rotation, AWQ / SmoothQuant scaling, GPTQ.

`layerwise_ptq(model, variables, batches, recipe, method)` quantizes every
Dense layer whose kernel a weight rule selects, in the order the forward
pass calls them, one stage at a time (a stage: the selected layers of one
parent module, e.g. a block's attention q, k, v, o). For each stage:

1. one pass over the calibration batches measures the stage's input
   statistics (`kdq.quant.input_statistics`), with every earlier stage
   already quantized and transformed, so each layer is calibrated on the
   inputs its quantized predecessors produce (memory: one stage's statistics);
2. per layer y = x W: an optional rotation R (a seeded randomised Hadamard
   matrix, `method.rotate`) and an optional per-input-channel divisor s
   (`method.scaling`: "smoothquant" from the activation maxima, "awq" by
   searching the output error over the Hessian) give the transformed pair
   x' = (x R) / s, W' = diag(s) R^T W (`kdq.quant.transforms`), with the
   Hessian H' = D^-1 R^T H R D^-1 (D = diag(s));
3. W' is quantized by its weight spec: round to nearest ("rtn") or GPTQ
   ("gptq", Frantar et al. 2023) with the Hessian H'.

Every other weight the rules select (convolutions, embeddings) is rounded to
nearest. Activations follow the recipe: dynamic ranges need nothing; static
ranges are measured at the end on the transformed inputs of the quantized
model. The result is an ordinary `QuantizedModel` (with `input_transforms`):
`fake_quant_apply`, `integer_apply` and the quantized checkpoints run it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kdq.quant.awq import awq_scales
from kdq.quant.calibration import calibrate_activations
from kdq.quant.gptq import gptq_quantize
from kdq.quant.input_statistics import InputStatistics, collect_input_statistics
from kdq.quant.integer import QuantizedModel, _act_scales
from kdq.quant.intercept import module_path, path_key
from kdq.quant.numerics import dequantize, quantize
from kdq.quant.qarray import QArray
from kdq.quant.recipe import QuantRecipe
from kdq.quant.rotation import hadamard_signs
from kdq.quant.smoothquant import smoothquant_scales
from kdq.quant.spec import QuantSpec
from kdq.quant.transforms import transform_interceptor, transform_kernel
from kdq.quant.tree import tree_specs

WEIGHT_METHODS = ("rtn", "gptq")
SCALINGS = (None, "awq", "smoothquant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQMethod:
    """How `layerwise_ptq` quantizes each Dense layer (module docstring).

    Attributes:
      weights: "rtn" (round to nearest) or "gptq".
      scaling: None, "awq" (weight-only: per-channel scales searched to
        minimise the output error) or "smoothquant" (W8A8: activation
        outliers migrated into the weights).
      rotate: rotate each layer's input by a randomised Hadamard matrix.
      smoothquant_alpha: SmoothQuant's migration strength alpha in [0, 1].
      awq_grid: AWQ's number of exponents alpha in {0, 1/grid, ...}.
      gptq_damping: GPTQ's relative damping lambda (H + lambda mean(diag H) I).
      gptq_block_size: GPTQ's lazy-update block.
      gptq_act_order: GPTQ processes columns by decreasing Hessian diagonal.
      seed: the rotations' random signs (layer path folded in).
    """

    weights: str = "rtn"
    scaling: str | None = None
    rotate: bool = False
    smoothquant_alpha: float = 0.5
    awq_grid: int = 20
    gptq_damping: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_METHODS:
            raise ValueError(f"weights must be one of {WEIGHT_METHODS}, got {self.weights!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if not isinstance(self.rotate, bool):
            raise ValueError(f"rotate must be a bool, got rotate={self.rotate!r}")

    @property
    def name(self) -> str:
        """e.g. "gptq", "awq+rtn", "rotate+smoothquant+rtn"."""
        parts = (["rotate"] if self.rotate else []) + ([self.scaling] if self.scaling else [])
        return "+".join([*parts, self.weights])


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What quantization did to one Dense layer.

    Attributes:
      path: module path.
      relative_error: tr(dW^T H dW) / tr(W^T H W) with H the layer's input
        Hessian and dW the quantized minus the float weight, both seen from
        the original input x: the calibration rows' squared output error
        relative to the output's energy.
      alpha: the AWQ exponent chosen (None without AWQ).
      damping: the GPTQ damping used (None without GPTQ).
    """

    path: str
    relative_error: float
    alpha: float | None = None
    damping: float | None = None


def _batch_passes(batches: Any) -> Callable[[], Iterable[Any]]:
    """A function giving a fresh iterator over the batches, for one pass per stage."""
    if callable(batches):
        return batches
    if isinstance(batches, Sequence) and not isinstance(batches, str | bytes):
        return lambda: iter(batches)
    raise ValueError(
        "layerwise PTQ makes one pass over the calibration batches per stage: pass a "
        "sequence (e.g. a list of arrays) or a function returning a fresh iterator, "
        f"got {type(batches).__name__}"
    )


def _dense_calls(model, variables, x, apply_kwargs) -> list[tuple[str, type]]:
    """(path, module type) of every Dense / DenseGeneral / Einsum / Conv call, in call order."""
    calls: list[tuple[str, type]] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and "kernel" in (
            context.module.variables.get("params") or {}
        ):
            entry = (module_path(context.module), type(context.module))
            if entry not in calls:
                calls.append(entry)
        return next_fun(*args, **kwargs)

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, x, **apply_kwargs)

    jax.eval_shape(run, variables, x)
    return calls


def _check_float(params: Any) -> None:
    quantized = [
        "/".join(str(k.key) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, QArray)
        )[0]
        if isinstance(leaf, QArray) or not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)
    ]
    if quantized:
        raise ValueError(
            f"post-training quantization needs float weights, but {quantized[:5]} are already "
            "quantized (QArray or integer arrays); start from the float model (e.g. "
            "kdq.quant.to_qat_state or the run's float export)"
        )


def _check_spec(path: str, kernel: np.ndarray, spec: QuantSpec) -> None:
    if kernel.ndim != 2:
        raise ValueError(f"layer {path!r} has a {kernel.ndim}-D kernel; layerwise PTQ needs (K, N)")
    if tuple(a % 2 for a in spec.axes) not in ((), (1,)):
        raise ValueError(
            f"the weight spec of {path!r} keeps axes {spec.axes}; layerwise PTQ quantizes per "
            "tensor or per output channel (axes=() or (-1,)), optionally per group"
        )
    if spec.group_size is not None and kernel.shape[0] % spec.group_size:
        raise ValueError(
            f"group_size={spec.group_size} does not divide the {kernel.shape[0]} input features "
            f"of layer {path!r}; use a group size that divides it (e.g. 32, 64 or 128 for "
            "widths that are multiples of 128), or exclude the layer with a rule"
        )


def _stages(paths: list[str]) -> list[list[str]]:
    """Consecutive layers with the same parent module form one stage, in call order."""
    stages: list[list[str]] = []
    for path in paths:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if stages and (stages[-1][0].rsplit("/", 1)[0] if "/" in stages[-1][0] else "") == parent:
            stages[-1].append(path)
        else:
            stages.append([path])
    return stages


def _quantize_layer(
    path: str, kernel: np.ndarray, stats: InputStatistics, spec: QuantSpec, method: PTQMethod
) -> tuple[QArray, dict[str, np.ndarray], LayerResult]:
    """The quantized W' of one layer, its input transform and its `LayerResult`."""
    transform: dict[str, np.ndarray] = {}
    hessian = stats.hessian  # of the rotated input when the layer is rotated
    if method.rotate:
        transform["rotation_signs"] = _rotation_signs(path, kernel.shape[0], method.seed)
    rotated = transform_kernel(kernel, transform)
    alpha = None
    if method.scaling == "smoothquant":
        transform["smoothing"] = smoothquant_scales(
            stats.abs_max, rotated, method.smoothquant_alpha
        ).astype(np.float32)
    elif method.scaling == "awq":
        search = awq_scales(rotated, hessian, stats.mean_abs, spec, grid=method.awq_grid)
        transform["smoothing"] = np.asarray(search.scales, np.float32)
        alpha = float(search.alpha)
    scaled = transform_kernel(kernel, transform)
    scaled_hessian = hessian
    if "smoothing" in transform:
        inverse = 1.0 / transform["smoothing"].astype(np.float64)
        scaled_hessian = hessian * np.outer(inverse, inverse)
    damping = None
    if method.weights == "gptq":
        result = gptq_quantize(
            scaled,
            scaled_hessian,
            spec,
            damping=method.gptq_damping,
            block_size=method.gptq_block_size,
            act_order=method.gptq_act_order,
        )
        qarray, damping = result.qarray, result.damping
    else:
        qarray = quantize(jnp.asarray(scaled, jnp.float32), spec)
    delta = np.asarray(dequantize(qarray), np.float64) - scaled
    energy = float(np.einsum("kn,kl,ln->", rotated, hessian, rotated))
    error = float(np.einsum("kn,kl,ln->", delta, scaled_hessian, delta))
    result = LayerResult(path, error / max(energy, 1e-30), alpha, damping)
    return qarray, transform, result


def _rotation_signs(path: str, size: int, seed: int) -> np.ndarray:
    return hadamard_signs(size, seed=(seed * 1_000_003 + path_key(path)) % 2**31)


def layerwise_ptq(
    model: nn.Module,
    variables: Any,
    batches: Any,
    recipe: QuantRecipe,
    method: PTQMethod,
    *,
    act_method: str = "minmax",
    progress: bool = True,
    **apply_kwargs: Any,
) -> tuple[QuantizedModel, list[LayerResult]]:
    """Quantizes a float model layer by layer (module docstring).

    Args:
      model: any Linen model; its Dense layers get `method`.
      variables: float variables ({"params": ..., other collections}).
      batches: calibration inputs: a sequence, or a function returning a
        fresh iterator (one pass per stage).
      recipe: weight rules (specs per tensor or per output channel, with
        optional group_size along the input features), activation rules and
        a mode that learns nothing ("calibrated" weights; "dynamic" or
        "static" activations).
      method: the `PTQMethod`.
      act_method: static activation calibration ("minmax", "ema", "percentile,<p>").
      progress: show a progress bar with one step per stage.
      **apply_kwargs: passed to `model.apply` (e.g. train=False).

    Returns:
      (the `QuantizedModel`, one `LayerResult` per Dense layer, in call order).

    Raises:
      ValueError: the weight rules select no Dense kernel, a spec this
        method cannot take (see `_check_spec`), weights already quantized,
        learned quantizers, non-finite calibration data, or an iterator
        that cannot be re-read.
    """
    _check_request(recipe, method)
    passes = _batch_passes(batches)
    params = variables["params"]
    _check_float(params)
    state = {name: value for name, value in variables.items() if name != "params"}
    first = next(iter(passes()), None)
    if first is None:
        raise ValueError("layerwise PTQ needs at least one calibration batch, got none")
    flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
    specs = dict(tree_specs(params, recipe.weight_rules))
    dense = _selected_dense_layers(model, variables, first, specs, recipe, apply_kwargs)
    for path in dense:
        _check_spec(path, flat[f"{path}/kernel"], specs[f"{path}/kernel"])

    current = dict(flat)  # float weights, the done layers' W' dequantized
    quantized: dict[str, Any] = {}
    transforms: dict[str, dict[str, np.ndarray]] = {}
    results: list[LayerResult] = []

    def apply(x, mutable):
        nested = {"params": flax.traverse_util.unflatten_dict(current, sep="/"), **state}
        with nn.intercept_methods(transform_interceptor(_nested(transforms))):
            return model.apply(nested, x, mutable=mutable, **apply_kwargs)

    bar = tqdm(_stages(dense), desc=f"PTQ {method.name}", unit="stage", disable=not progress)
    for stage in bar:
        rotations = {}
        if method.rotate:
            rotations = {
                p: _rotation_signs(p, flat[f"{p}/kernel"].shape[0], method.seed) for p in stage
            }
        stats = collect_input_statistics(apply, passes(), set(stage), rotations=rotations)
        for path in stage:
            key = f"{path}/kernel"
            qarray, transform, result = _quantize_layer(
                path, flat[key].astype(np.float64), stats[path], specs[key], method
            )
            quantized[key] = qarray
            current[key] = np.asarray(dequantize(qarray))
            if transform:
                transforms[path] = transform
            results.append(result)
        bar.set_postfix(layer=stage[-1], error=f"{results[-1].relative_error:.2e}")
    bar.close()

    for key, spec in specs.items():
        if spec is not None and key not in quantized:
            quantized[key] = recipe.weight_quantizer.export(flat[key], spec, {}, key)
    all_params = {**{k: jnp.asarray(v) for k, v in flat.items()}, **quantized}
    qmodel = QuantizedModel(
        params=flax.traverse_util.unflatten_dict(all_params, sep="/"),
        act_scales=_static_act_scales(
            model, flat, quantized, state, transforms, passes, recipe, act_method, apply_kwargs
        ),
        recipe=recipe.with_nearest_rounding(),
        model_state=dict(state),
        input_transforms=jax.tree_util.tree_map(jnp.asarray, _nested(transforms)),
    )
    return qmodel, results


def _check_request(recipe: QuantRecipe, method: PTQMethod) -> None:
    if recipe.weight_quantizer.learned or recipe.act_quantizer.learned:
        raise ValueError(
            "layerwise PTQ needs quantizers without learned state (weight_mode "
            f"'calibrated', act_mode 'dynamic' or 'static'), got {recipe.weight_mode!r} / "
            f"{recipe.act_mode!r}"
        )
    if method.scaling == "smoothquant" and not recipe.quantizes_activations:
        raise ValueError(
            "SmoothQuant moves activation outliers into the weights for W8A8 and needs "
            "act_rules; for weight-only quantization use scaling='awq'"
        )


def _selected_dense_layers(model, variables, x, specs, recipe, apply_kwargs) -> list[str]:
    """Paths of the Dense layers whose kernel a weight rule selects, in call order."""
    selected = {p for p, s in specs.items() if s is not None}
    calls = _dense_calls(model, variables, x, apply_kwargs)
    dense = [p for p, kind in calls if kind is nn.Dense and f"{p}/kernel" in selected]
    if not dense:
        raise ValueError(
            f"the weight rules {[p for p, _ in recipe.weight_rules]} select no Dense kernel "
            f"(Dense layers: {[p for p, k in calls if k is nn.Dense]}); layerwise PTQ "
            "quantizes Dense layers"
        )
    return dense


def _static_act_scales(
    model, flat, quantized, state, transforms, passes, recipe, act_method, apply_kwargs
) -> Any:
    """Static activation scales measured on the quantized, transformed model ({} if dynamic)."""
    if not recipe.act_quantizer.needs_calibration:
        return {}
    dequantized = {k: np.asarray(dequantize(v)) for k, v in quantized.items()}
    params = flax.traverse_util.unflatten_dict({**flat, **dequantized}, sep="/")
    with nn.intercept_methods(transform_interceptor(_nested(transforms))):
        ranges = calibrate_activations(
            model,
            {"params": params, **state},
            list(passes()),
            recipe,
            method=act_method,
            **apply_kwargs,
        )
    return _act_scales({"activations": ranges}, recipe)


def _nested(transforms: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """{path: entry} -> nested by module path, as `QuantizedModel.input_transforms`."""
    flat = {
        f"{path}/{name}": value
        for path, entry in transforms.items()
        for name, value in entry.items()
    }
    return flax.traverse_util.unflatten_dict(flat, sep="/")
