"""Quantization-aware forward passes and the quantizer state they learn.

`quant_params` = {"weights": {param path...: state},   (learned weight modes, e.g. "lsq")
                  "activations": {module path...: state}}     (see kdq.quant.intercept)

nested like the params / module tree; each state is what the recipe's
quantizer (`kdq.quant.quantizers`) keeps. Every array in it is a plain
leaf: the train step differentiates and updates it with the same optax
optimizer as the params. Learned values are stored as logarithms (LSQ
steps as "log_step", PACT clip values as "log_alpha"), so they stay positive
whatever the update; static ranges are in it too ("scale", "zero_point")
and receive no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax
import flax.linen as nn
import jax

from kdq.quant.calibration import BatchCalibration
from kdq.quant.intercept import activation_interceptor, module_rules, path_key
from kdq.quant.quantizers.lsq import LSQ_INITS
from kdq.quant.recipe import QuantRecipe
from kdq.quant.tree import states_by_path, tree_specs


def quantized_weights(
    params: Any, recipe: QuantRecipe, quant_params: Any = None, *, key: jax.Array | None = None
) -> Any:
    """The weights the model computes with under `recipe` (fake-quantized, STE gradients).

    Args:
      params: float params.
      recipe: the quantization recipe (its weight rules and weight mode).
      quant_params: quantizer state; its "weights" hold learned weight state.
      key: PRNG key for rules with rounding="stochastic"; the leaf at path p
        uses fold_in(key, path_key(p)).

    Returns:
      Params of the same structure, selected leaves fake-quantized.
    """
    if not recipe.quantizes_weights:
        return params
    quantizer = recipe.weight_quantizer
    states = states_by_path((quant_params or {}).get("weights"))
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for path, spec in tree_specs(params, recipe.weight_rules):
        if spec is not None:
            leaf_key = None
            if key is not None and spec.rounding == "stochastic":
                leaf_key = jax.random.fold_in(key, path_key(path))
            state = states.get(path, {})
            flat[path] = quantizer.apply(flat[path], spec, state, key=leaf_key, path=path)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def _model_apply(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> Any:
    return model.apply(variables, *args, **kwargs)


def apply_quantized(
    model: nn.Module,
    variables: Any,
    *args: Any,
    recipe: QuantRecipe,
    quant_params: Any = None,
    key: jax.Array | None = None,
    apply_fn: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> Any:
    """`model.apply` with weights and activations fake-quantized by `recipe`.

    Args:
      model: any Linen model.
      variables: its variables; variables["params"] are the float weights.
      *args, **kwargs: as for `model.apply` (mutable=..., train=...).
      recipe: the quantization recipe.
      quant_params: learned / calibrated quantizer state (see module docstring).
      key: PRNG key for stochastic rounding; weights use fold_in(key, 0) and
        activations fold_in(key, 1), each folded further per path.
      apply_fn: `apply_fn(model, variables, *args, **kwargs)` runs the model
        (default: `model.apply(variables, *args, **kwargs)`), e.g.
        `functools.partial(kdq.distill.apply_with_taps, taps=...)`.

    Returns:
      What `apply_fn` returns.
    """
    apply_fn = apply_fn or _model_apply
    quant_params = quant_params or {}
    weight_key, act_key = (None, None) if key is None else quantizer_keys(key)
    variables = {
        **variables,
        "params": quantized_weights(variables["params"], recipe, quant_params, key=weight_key),
    }
    if not recipe.quantizes_activations:
        return apply_fn(model, variables, *args, **kwargs)
    interceptor = activation_interceptor(recipe, quant_params.get("activations"), key=act_key)
    with nn.intercept_methods(interceptor):
        return apply_fn(model, variables, *args, **kwargs)


def quantizer_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weight key, activation key) = (fold_in(key, 0), fold_in(key, 1))."""
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def quantizer_penalties(quant_params: Any, recipe: QuantRecipe) -> dict[str, jax.Array]:
    """The training-loss terms of the recipe's quantizers, by name.

    {} unless a quantizer has one; act_mode "pact" with pact_alpha_decay
    lambda > 0 gives {"pact_alpha_decay": lambda * sum alpha^2} over every
    clipping value (Choi et al. 2018, section 2; `kdq.quant.quantizers.pact`).

    Args:
      quant_params: quantizer state (see module docstring).
      recipe: the quantization recipe.

    Returns:
      {name: float32 scalar}, each to be added to the loss.
    """
    quant_params = quant_params or {}
    return {
        **recipe.weight_quantizer.penalties(quant_params.get("weights", {}), recipe),
        **recipe.act_quantizer.penalties(quant_params.get("activations", {}), recipe),
    }


def _init_weights(params: Any, recipe: QuantRecipe, lsq_init: str) -> Any:
    quantizer = recipe.weight_quantizer
    if not recipe.quantizes_weights or not quantizer.learned:
        return {}
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    weights = {}
    for path, spec in tree_specs(params, recipe.weight_rules):
        if spec is not None:
            weights[path] = quantizer.init(flat[path], spec, lsq_init=lsq_init)
    return flax.traverse_util.unflatten_dict(weights, sep="/")


def init_quant_params(
    model: nn.Module,
    variables: Any,
    recipe: QuantRecipe,
    batches: Iterable[jax.Array] = (),
    *,
    act_method: str = "minmax",
    lsq_init: str = "calibration",
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Initial quantizer state for `recipe`.

    lsq_init="calibration" (default): LSQ weight steps start at the calibrated
    scale of each weight (the spec's calibration, e.g. absmax per channel);
    LSQ activation steps and PACT clip values start from the activation
    ranges measured on `batches` (with the weights already quantized):
    step = scale, alpha = scale * qmax. QAT then starts from exactly the
    post-training-quantized model, with no weight clipped.

    lsq_init="paper": LSQ steps (weights and activations) start at
    s0 = 2 <|v|> / sqrt(Q_P) (Esser et al. 2020), <|v|> the mean |value| of
    the weights of one step group, or of a module's inputs over `batches`;
    PACT clip values and static ranges still come from calibration.

    Each mode's quantizer (`kdq.quant.quantizers`) makes its state from
    these measurements; learned values are stored as logarithms.

    Args:
      model: any Linen model.
      variables: its variables (variables["params"] float).
      recipe: the quantization recipe.
      batches: calibration inputs (needed when the activation quantizer
        keeps state: every act_mode but "dynamic").
      act_method: activation range method (see `calibrate_activations`).
      lsq_init: "calibration" or "paper" (see above).
      **apply_kwargs: passed to `model.apply`.

    Returns:
      {"weights": ..., "activations": ...}.
    """
    if lsq_init not in LSQ_INITS:
        raise ValueError(f"lsq_init must be one of {LSQ_INITS}, got lsq_init={lsq_init!r}")
    params = variables["params"]
    quant_params = {"weights": _init_weights(params, recipe, lsq_init), "activations": {}}
    quantizer = recipe.act_quantizer
    if not recipe.quantizes_activations or not quantizer.needs_calibration:
        return quant_params
    batches = list(batches)
    if not batches:
        raise ValueError(
            f"act_mode={recipe.act_mode!r} needs calibration batches to initialise the "
            "activation quantizers; pass batches=[x1, x2, ...]"
        )
    # Ranges are measured through the weights as they are exported: rounded to nearest.
    nearest = recipe.with_nearest_rounding()
    calibration_vars = {**variables, "params": quantized_weights(params, nearest, quant_params)}
    calibration = BatchCalibration(
        model, calibration_vars, batches, recipe, method=act_method, **apply_kwargs
    )
    rules = module_rules(recipe.act_rules)
    state = {
        path: quantizer.init(rules.value(path), calibration, path, lsq_init=lsq_init)
        for path in calibration.ranges
    }
    quant_params["activations"] = flax.traverse_util.unflatten_dict(state, sep="/")
    return quant_params
