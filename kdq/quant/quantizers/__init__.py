"""Quantizer modes: one module per mode, each registering its quantizer object.

Activation modes (`QuantRecipe.act_mode`): dynamic, static, lsq, pact.
Weight modes (`QuantRecipe.weight_mode`): calibrated, lsq. The interface
is in `kdq.quant.quantizers.base`; every module of this package is
imported here, so adding a mode is writing one module that calls
`register(...)` (or, outside kdq, by calling `register` before building a
`QuantRecipe` with it).
"""

from __future__ import annotations

import importlib
import pkgutil

from kdq.quant.quantizers.base import (
    ACT_QUANTIZERS,
    WEIGHT_QUANTIZERS,
    ActQuantizer,
    Calibration,
    LearnedActQuantizer,
    WeightQuantizer,
    act_quantizer,
    learned_scale,
    learned_state,
    learned_value,
    register,
    weight_quantizer,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ACT_QUANTIZERS",
    "WEIGHT_QUANTIZERS",
    "ActQuantizer",
    "Calibration",
    "LearnedActQuantizer",
    "WeightQuantizer",
    "act_quantizer",
    "learned_scale",
    "learned_state",
    "learned_value",
    "register",
    "weight_quantizer",
]
