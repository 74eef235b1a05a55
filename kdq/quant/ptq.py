"""Post-training quantization: float params + calibration data -> quantized model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax

from kdq.quant.integer import QuantizedModel, to_quantized_model
from kdq.quant.layerwise import PTQMethod, layerwise_ptq
from kdq.quant.qat import init_quant_params
from kdq.quant.recipe import PTQ_ACT_MODES, PTQ_WEIGHT_MODES, QuantRecipe


def ptq(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[jax.Array],
    recipe: QuantRecipe,
    *,
    act_method: str = "minmax",
    method: PTQMethod | None = None,
    **apply_kwargs: Any,
) -> QuantizedModel:
    """Quantizes a trained float model without training.

    Without `method`, weights are quantized by `recipe.weight_rules` (their
    specs' calibration: absmax, minmax, percentile or an MSE clipping
    search); activation ranges are measured on `batches` with the quantized
    weights in place. With a `PTQMethod` (GPTQ, AWQ, SmoothQuant, Hadamard
    rotation), Dense layers are quantized layer by layer from their input
    statistics (`kdq.quant.layerwise.layerwise_ptq`).

    Args:
      model: any Linen model.
      variables: its trained variables (variables["params"] float).
      batches: calibration inputs, each (B, ...).
      recipe: with quantizers that learn nothing: weight_mode "calibrated"
        and act_mode "static" (or "dynamic" for per-batch activation ranges
        at inference).
      act_method: "minmax", "ema" or "percentile,<p>".
      method: a `kdq.quant.layerwise.PTQMethod`, or None for round to nearest.
      **apply_kwargs: passed to `model.apply` (e.g. train=False).

    Returns:
      The `QuantizedModel` (run it with `integer_apply` / `fake_quant_apply`).
    """
    if method is not None:
        return layerwise_ptq(
            model, variables, batches, recipe, method, act_method=act_method, **apply_kwargs
        )[0]
    if recipe.weight_quantizer.learned or recipe.act_quantizer.learned:
        raise ValueError(
            f"ptq needs quantizers without learned state: weight_mode in {PTQ_WEIGHT_MODES} "
            f"and act_mode in {PTQ_ACT_MODES}, got weight_mode={recipe.weight_mode!r}, "
            f"act_mode={recipe.act_mode!r}"
        )
    quant_params = init_quant_params(
        model, variables, recipe, batches, act_method=act_method, **apply_kwargs
    )
    model_state = {name: value for name, value in variables.items() if name != "params"}
    return to_quantized_model(variables["params"], recipe, quant_params, model_state=model_state)
