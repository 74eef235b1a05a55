"""Quantization-aware forward passes and the quantizer state they learn.

`quant_params` = {"weights": {param path...: {"step": s}},   (weight_mode "lsq")
                  "activations": {module path...: state}}     (see kdq.quant.intercept)

nested like the params / module tree. Every array in it is a plain leaf: the
train step differentiates and updates it with the same optax optimizer as
the params (LSQ steps, PACT clip values); static ranges are in it too and
receive no gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax
import flax.linen as nn
import jax

from kdq.quant.calibration import calibrate_activations
from kdq.quant.intercept import activation_interceptor, activation_report
from kdq.quant.numerics import calibrate
from kdq.quant.recipe import QuantRecipe
from kdq.quant.ste import lsq_fake_quant
from kdq.quant.tree import fake_quant_tree, tree_specs


def quantized_weights(params: Any, recipe: QuantRecipe, quant_params: Any = None) -> Any:
    """The weights the model computes with under `recipe` (fake-quantized, STE gradients).

    Args:
      params: float params.
      recipe: the quantization recipe (its weight rules and weight mode).
      quant_params: quantizer state; its "weights" hold the LSQ steps.

    Returns:
      Params of the same structure, selected leaves fake-quantized.
    """
    if not recipe.quantizes_weights:
        return params
    if recipe.weight_mode == "calibrated":
        return fake_quant_tree(params, recipe.weight_rules)
    steps = flax.traverse_util.flatten_dict(quant_params["weights"], sep="/")
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for path, spec in tree_specs(params, recipe.weight_rules):
        if spec is not None:
            flat[path] = lsq_fake_quant(flat[path], steps[f"{path}/step"], spec)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def apply_quantized(
    model: nn.Module,
    variables: Any,
    *args: Any,
    recipe: QuantRecipe,
    quant_params: Any = None,
    **kwargs: Any,
) -> Any:
    """`model.apply` with weights and activations fake-quantized by `recipe`.

    Args:
      model: any Linen model.
      variables: its variables; variables["params"] are the float weights.
      *args, **kwargs: as for `model.apply` (mutable=..., train=...).
      recipe: the quantization recipe.
      quant_params: learned / calibrated quantizer state (see module docstring).

    Returns:
      What `model.apply` returns.
    """
    quant_params = quant_params or {}
    variables = {
        **variables,
        "params": quantized_weights(variables["params"], recipe, quant_params),
    }
    if not recipe.quantizes_activations:
        return model.apply(variables, *args, **kwargs)
    interceptor = activation_interceptor(recipe, quant_params.get("activations"))
    with nn.intercept_methods(interceptor):
        return model.apply(variables, *args, **kwargs)


def init_quant_params(
    model: nn.Module,
    variables: Any,
    recipe: QuantRecipe,
    batches: Iterable[jax.Array] = (),
    *,
    act_method: str = "minmax",
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Initial quantizer state for `recipe`, from calibration.

    LSQ weight steps start at the calibrated scale of each weight; static
    ranges, LSQ activation steps and PACT clip values start from activation
    ranges measured on `batches` (with the weights already quantized):
    step = scale, alpha = scale * qmax.

    Args:
      model: any Linen model.
      variables: its variables (variables["params"] float).
      recipe: the quantization recipe.
      batches: calibration inputs (needed unless act_mode is "dynamic").
      act_method: activation range method (see `calibrate_activations`).
      **apply_kwargs: passed to `model.apply`.

    Returns:
      {"weights": ..., "activations": ...}.
    """
    params = variables["params"]
    weights = {}
    if recipe.quantizes_weights and recipe.weight_mode == "lsq":
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        for path, spec in tree_specs(params, recipe.weight_rules):
            if spec is not None:
                weights[f"{path}/step"] = calibrate(flat[path], spec)[0]
        weights = flax.traverse_util.unflatten_dict(weights, sep="/")
    quant_params = {"weights": weights, "activations": {}}
    if not recipe.quantizes_activations or recipe.act_mode == "dynamic":
        return quant_params
    batches = list(batches)
    if not batches:
        raise ValueError(
            f"act_mode={recipe.act_mode!r} needs calibration batches to initialise the "
            "activation quantizers; pass batches=[x1, x2, ...]"
        )
    calibration_vars = {**variables, "params": quantized_weights(params, recipe, quant_params)}
    ranges = calibrate_activations(
        model, calibration_vars, batches, recipe, method=act_method, **apply_kwargs
    )
    if recipe.act_mode == "static":
        quant_params["activations"] = ranges
        return quant_params
    specs = activation_report(model, variables, batches[0], rules=recipe.act_rules, **apply_kwargs)
    flat = flax.traverse_util.flatten_dict(ranges, sep="/")
    state = {}
    for path, spec in specs.items():
        if spec is None:
            continue
        scale = flat[f"{path}/scale"]
        if recipe.act_mode == "lsq":
            state[f"{path}/step"] = scale
        else:
            state[f"{path}/alpha"] = scale * spec.qmax
    quant_params["activations"] = flax.traverse_util.unflatten_dict(state, sep="/")
    return quant_params
