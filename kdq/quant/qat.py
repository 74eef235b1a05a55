"""Quantization-aware forward passes and the quantizer state they learn.

`quant_params` = {"weights": {param path...: {"log_step": log s}},   (weight_mode "lsq")
                  "activations": {module path...: state}}     (see kdq.quant.intercept)

nested like the params / module tree. Every array in it is a plain leaf: the
train step differentiates and updates it with the same optax optimizer as
the params. Learned values are stored as logarithms (LSQ steps as "log_step",
PACT clip values as "log_alpha"), so they stay positive whatever the update
(see `kdq.quant.ste`); static ranges are in it too ("scale", "zero_point")
and receive no gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdq.quant.calibration import calibrate_activations
from kdq.quant.intercept import (
    STATS_COLLECTION,
    activation_interceptor,
    activation_report,
    path_key,
)
from kdq.quant.numerics import _reduce, calibrate, fake_quant, scale_shape
from kdq.quant.recipe import QuantRecipe
from kdq.quant.spec import QuantSpec
from kdq.quant.ste import (
    PACT_KEY,
    learned_alpha,
    learned_state,
    learned_step,
    lsq_fake_quant,
)
from kdq.quant.tree import fake_quant_tree, tree_specs

LSQ_INITS = ("calibration", "paper")


def quantized_weights(
    params: Any, recipe: QuantRecipe, quant_params: Any = None, *, key: jax.Array | None = None
) -> Any:
    """The weights the model computes with under `recipe` (fake-quantized, STE gradients).

    Args:
      params: float params.
      recipe: the quantization recipe (its weight rules and weight mode).
      quant_params: quantizer state; its "weights" hold the LSQ log steps.
      key: PRNG key for rules with rounding="stochastic" (calibrated mode);
        the leaf at path p uses fold_in(key, path_key(p)).

    Returns:
      Params of the same structure, selected leaves fake-quantized.
    """
    if not recipe.quantizes_weights:
        return params
    if recipe.weight_mode == "calibrated":
        if key is None or not recipe.stochastic:
            return fake_quant_tree(params, recipe.weight_rules)
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        for path, spec in tree_specs(params, recipe.weight_rules):
            if spec is not None:
                leaf_key = jax.random.fold_in(key, path_key(path))
                flat[path] = fake_quant(flat[path], spec, key=leaf_key)
        return flax.traverse_util.unflatten_dict(flat, sep="/")
    state = flax.traverse_util.flatten_dict((quant_params or {}).get("weights", {}), sep="/")
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for path, spec in tree_specs(params, recipe.weight_rules):
        if spec is not None:
            step = learned_step(weight_state(state, path), path)
            flat[path] = lsq_fake_quant(flat[path], step, spec)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def weight_state(flat_state: dict[str, Any], path: str) -> dict[str, Any]:
    """The state entries of param `path` in '/'-flattened weight state, keys relative to it."""
    prefix = f"{path}/"
    return {k[len(prefix) :]: v for k, v in flat_state.items() if k.startswith(prefix)}


def apply_quantized(
    model: nn.Module,
    variables: Any,
    *args: Any,
    recipe: QuantRecipe,
    quant_params: Any = None,
    key: jax.Array | None = None,
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

    Returns:
      What `model.apply` returns.
    """
    quant_params = quant_params or {}
    weight_key, act_key = (None, None) if key is None else quantizer_keys(key)
    variables = {
        **variables,
        "params": quantized_weights(variables["params"], recipe, quant_params, key=weight_key),
    }
    if not recipe.quantizes_activations:
        return model.apply(variables, *args, **kwargs)
    interceptor = activation_interceptor(recipe, quant_params.get("activations"), key=act_key)
    with nn.intercept_methods(interceptor):
        return model.apply(variables, *args, **kwargs)


def quantizer_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weight key, activation key) = (fold_in(key, 0), fold_in(key, 1))."""
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def pact_alpha_penalty(quant_params: Any, recipe: QuantRecipe) -> jax.Array:
    """PACT's regulariser lambda * sum_alpha alpha^2 (Choi et al. 2018, section 2).

    lambda = `recipe.pact_alpha_decay`; the sum runs over every clipping value
    of `quant_params["activations"]` (0.0 unless act_mode is "pact"). Added to
    the training loss, it pulls alpha down at rate 2 lambda alpha, so a clip
    value that no input reaches shrinks instead of staying where it started.

    Args:
      quant_params: quantizer state (see module docstring).
      recipe: the quantization recipe.

    Returns:
      The penalty, a float32 scalar.
    """
    if recipe.act_mode != "pact" or not recipe.pact_alpha_decay:
        return jnp.zeros((), jnp.float32)
    flat = flax.traverse_util.flatten_dict((quant_params or {}).get("activations", {}), sep="/")
    total = jnp.zeros((), jnp.float32)
    for key, value in flat.items():
        if key.rsplit("/", 1)[-1] == PACT_KEY:
            total = total + jnp.sum(jnp.square(learned_alpha({PACT_KEY: value})))
    return recipe.pact_alpha_decay * total


def lsq_paper_step(x: Any, spec: QuantSpec) -> jax.Array:
    """LSQ's initial step s0 = 2 <|v|> / sqrt(Q_P) (Esser et al. 2020, section 2.1).

    <|v|> is the mean of |x| over the elements sharing one step (per tensor,
    per output channel for `spec.axes`, per group for `spec.group_size`),
    Q_P = spec.qmax. A group of zeros gets step 1 (any step represents 0).

    Args:
      x: the weights, or a batch of activations.
      spec: the quantizer (its axes choose the step's shape).

    Returns:
      float32 step of shape `kdq.quant.scale_shape(x.shape, spec)`.
    """
    x = jnp.abs(jnp.asarray(x, jnp.float32))
    mean = _reduce(x, scale_shape(x.shape, spec), jnp.mean)
    step = 2.0 * mean / np.sqrt(np.float32(spec.qmax))
    return jnp.where(step > 0, step, 1.0)


def _mean_abs_inputs(model, variables, batches, recipe, apply_kwargs) -> dict[str, float]:
    """{module path: mean over batches of <|x|>} for every selected module input."""

    def record(x, spec):
        mean = jnp.mean(jnp.abs(x.astype(jnp.float32)))
        return mean, mean

    @jax.jit
    def stats_of(variables, x):
        with nn.intercept_methods(activation_interceptor(recipe, record=record)):
            _, state = model.apply(variables, x, mutable=[STATS_COLLECTION], **apply_kwargs)
        return state[STATS_COLLECTION]

    per_batch = [
        flax.traverse_util.flatten_dict(jax.device_get(stats_of(variables, x)), sep="/")
        for x in batches
    ]
    paths = {key.rsplit("/", 1)[0] for key in per_batch[0]}
    return {path: float(np.mean([np.mean(b[f"{path}/hi"]) for b in per_batch])) for path in paths}


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

    Static ranges come from calibration in both cases. Learned values are
    stored as logarithms (`kdq.quant.ste.learned_state`).

    Args:
      model: any Linen model.
      variables: its variables (variables["params"] float).
      recipe: the quantization recipe.
      batches: calibration inputs (needed unless act_mode is "dynamic").
      act_method: activation range method (see `calibrate_activations`).
      lsq_init: "calibration" or "paper" (see above).
      **apply_kwargs: passed to `model.apply`.

    Returns:
      {"weights": ..., "activations": ...}.
    """
    if lsq_init not in LSQ_INITS:
        raise ValueError(f"lsq_init must be one of {LSQ_INITS}, got lsq_init={lsq_init!r}")
    params = variables["params"]
    weights = {}
    if recipe.quantizes_weights and recipe.weight_mode == "lsq":
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        for path, spec in tree_specs(params, recipe.weight_rules):
            if spec is None:
                continue
            if lsq_init == "paper":
                step = lsq_paper_step(flat[path], spec)
            else:
                step = calibrate(flat[path], spec)[0]
            weights[path] = learned_state(step, spec, "lsq")
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
    # Ranges are measured through the weights as they are exported: rounded to nearest.
    nearest = recipe.with_nearest_rounding()
    calibration_vars = {**variables, "params": quantized_weights(params, nearest, quant_params)}
    ranges = calibrate_activations(
        model, calibration_vars, batches, recipe, method=act_method, **apply_kwargs
    )
    if recipe.act_mode == "static":
        quant_params["activations"] = ranges
        return quant_params
    specs = activation_report(model, variables, batches[0], rules=recipe.act_rules, **apply_kwargs)
    flat = flax.traverse_util.flatten_dict(ranges, sep="/")
    means = {}
    if recipe.act_mode == "lsq" and lsq_init == "paper":
        means = _mean_abs_inputs(model, calibration_vars, batches, recipe, apply_kwargs)
    state = {}
    for path, spec in specs.items():
        if spec is None:
            continue
        scale = flat[f"{path}/scale"]
        if path in means:
            scale = lsq_paper_step(np.full((1,), means[path], np.float32), spec).reshape(())
        state[path] = learned_state(scale, spec, recipe.act_mode)
    quant_params["activations"] = flax.traverse_util.unflatten_dict(state, sep="/")
    return quant_params
