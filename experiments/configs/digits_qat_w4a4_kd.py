"""QAT of the CNN at 4-bit weights and activations, distilled from its float self.

Starts from the float CNN (`--config.init_from`), learns LSQ step sizes for
weights (per output channel) and activations (per tensor, unsigned: every
quantized input is an image or a ReLU output), initialised from calibration,
and distils from the same float CNN as teacher.
"""

from experiments.configs import digits_teacher


def get_config(bits: int = 4):
    config = digits_teacher.get_config()
    config.init_from = "runs/digits_teacher"
    config.teacher.name = config.model.name
    config.teacher.options = config.model.options
    config.teacher.workdir = "runs/digits_teacher"
    config.losses = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 2.0}}
    config.quant.weight_bits = bits
    config.quant.weight_mode = "lsq"
    config.quant.act_bits = bits
    config.quant.act_signed = False
    config.quant.act_mode = "lsq"
    config.optimizer.learning_rate = 1e-3
    config.num_steps = 400
    return config
