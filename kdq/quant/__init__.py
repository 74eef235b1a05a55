"""Quantization: numerics, straight-through estimators, rules over pytrees."""

from kdq.quant.numerics import calibrate, dequantize, fake_quant, quantize, scale_shape
from kdq.quant.qarray import QArray
from kdq.quant.spec import QuantSpec
from kdq.quant.ste import (
    clipped_straight_through,
    lsq_fake_quant,
    lsq_grad_scale,
    pact_fake_quant,
    round_ste,
    straight_through,
)
from kdq.quant.tree import dequantize_tree, fake_quant_tree, quantize_tree, tree_specs

__all__ = [
    "QArray",
    "QuantSpec",
    "calibrate",
    "clipped_straight_through",
    "dequantize",
    "dequantize_tree",
    "fake_quant",
    "fake_quant_tree",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "pact_fake_quant",
    "quantize",
    "quantize_tree",
    "round_ste",
    "scale_shape",
    "straight_through",
    "tree_specs",
]
