"""Post-training quantization of the float CNN teacher: int8 weights and activations.

Per-channel int8 weights (absmax), static per-tensor int8 activation ranges
from 4 calibration batches (min/max). `--config.init_from` is the float run
(default runs/digits_teacher). Nothing is trained: run it with the PTQ entry point,

    python -m experiments.ptq --config=experiments/configs/digits_ptq_w8a8.py \
        --workdir=runs/ptq_w8a8
"""

from experiments.configs import digits_teacher


def get_config():
    config = digits_teacher.get_config()
    config.entry_point = "ptq"
    config.init_from = "runs/digits_teacher"
    config.quant.weight_bits = 8
    config.quant.act_bits = 8
    config.quant.act_mode = "static"
    config.quant.act_calibration = "minmax"
    return config
