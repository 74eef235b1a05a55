"""Post-training quantization of the float CNN teacher: int8 weights and activations.

Per-channel int8 weights (absmax), static per-tensor int8 activation ranges
from 4 calibration batches (min/max). `--config.init_from` is the float run
(default runs/digits_teacher).
"""

from experiments.configs import digits_teacher


def get_config():
    config = digits_teacher.get_config()
    config.mode = "ptq"
    config.init_from = "runs/digits_teacher"
    config.quant.weight_bits = 8
    config.quant.act_bits = 8
    config.quant.act_mode = "static"
    config.quant.act_calibration = "minmax"
    return config
