"""The distilled student with 4-bit per-channel weights (QAT + KD)."""

from experiments.configs import digits_kd


def get_config():
    config = digits_kd.get_config()
    config.quant.weight_bits = 4
    config.quant.per_channel = True
    return config
