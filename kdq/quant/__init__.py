"""Quantization: numerics, straight-through estimators, rules over pytrees,
quantizer modes, activation quantization, calibration, QAT state, PTQ and
integer inference."""

from kdq.quant.awq import awq_scales
from kdq.quant.calibration import calibrate_activations
from kdq.quant.contraction import ContractionLayout, check_weight_spec, contraction_layout
from kdq.quant.gptq import gptq_quantize
from kdq.quant.input_statistics import InputStatistics, collect_input_statistics
from kdq.quant.integer import (
    QuantizedModel,
    fake_quant_apply,
    integer_apply,
    to_qat_state,
    to_quantized_model,
)
from kdq.quant.intercept import activation_interceptor, activation_report
from kdq.quant.layerwise import LayerResult, PTQMethod, layerwise_ptq
from kdq.quant.numerics import (
    calibrate,
    dequantize,
    fake_quant,
    group_axis,
    quantize,
    scale_from_range,
    scale_shape,
)
from kdq.quant.ptq import ptq
from kdq.quant.qarray import QArray
from kdq.quant.qat import (
    apply_quantized,
    init_quant_params,
    quantized_weights,
    quantizer_penalties,
)
from kdq.quant.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    learned_scale,
    learned_state,
)
from kdq.quant.quantizers.lsq import learned_step, lsq_paper_step
from kdq.quant.quantizers.pact import learned_alpha
from kdq.quant.recipe import FLOAT, QuantRecipe, is_integer_model
from kdq.quant.rotation import hadamard_matrix, hadamard_signs, rotate, rotate_weight
from kdq.quant.smoothquant import smoothquant_scales
from kdq.quant.spec import QuantSpec
from kdq.quant.ste import (
    clipped_straight_through,
    lsq_fake_quant,
    lsq_grad_scale,
    pact_fake_quant,
    round_ste,
    straight_through,
)
from kdq.quant.transforms import transform_input, transform_interceptor, transform_kernel
from kdq.quant.tree import dequantize_tree, fake_quant_tree, quantize_tree, tree_specs

__all__ = [
    "awq_scales",
    "gptq_quantize",
    "InputStatistics",
    "collect_input_statistics",
    "LayerResult",
    "PTQMethod",
    "layerwise_ptq",
    "hadamard_matrix",
    "hadamard_signs",
    "rotate",
    "rotate_weight",
    "smoothquant_scales",
    "transform_input",
    "transform_interceptor",
    "transform_kernel",
    "FLOAT",
    "ActQuantizer",
    "ContractionLayout",
    "QArray",
    "QuantRecipe",
    "QuantSpec",
    "QuantizedModel",
    "WeightQuantizer",
    "activation_interceptor",
    "activation_report",
    "apply_quantized",
    "calibrate",
    "calibrate_activations",
    "check_weight_spec",
    "clipped_straight_through",
    "contraction_layout",
    "dequantize",
    "dequantize_tree",
    "fake_quant",
    "fake_quant_apply",
    "fake_quant_tree",
    "group_axis",
    "init_quant_params",
    "integer_apply",
    "is_integer_model",
    "learned_alpha",
    "learned_scale",
    "learned_state",
    "learned_step",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "lsq_paper_step",
    "pact_fake_quant",
    "ptq",
    "quantize",
    "quantize_tree",
    "quantized_weights",
    "quantizer_penalties",
    "round_ste",
    "scale_from_range",
    "scale_shape",
    "straight_through",
    "to_qat_state",
    "to_quantized_model",
    "tree_specs",
]
