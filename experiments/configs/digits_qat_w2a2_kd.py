"""QAT of the CNN at 2-bit weights and activations (LSQ), distilled from its float self."""

from experiments.configs import digits_qat_w4a4_kd


def get_config():
    return digits_qat_w4a4_kd.get_config(bits=2)
