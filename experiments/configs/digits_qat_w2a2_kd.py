"""QAT of the CNN at 2-bit weights and activations (LSQ), distilled from its float self.

As usual below 4 bits, the first layer (whose input is the image) and the
last layer keep 8-bit weights and inputs; every other layer is 2-bit. The
distillation term carries more weight than at 4 bits (0.8 KD + 0.2 CE).
"""

from experiments.configs import digits_qat_w4a4_kd


def get_config():
    config = digits_qat_w4a4_kd.get_config(bits=2)
    config.quant.edge_layers = "Conv_0|Dense_1"
    config.losses = {"ce": {"weight": 0.2}, "kd": {"weight": 0.8, "temperature": 2.0}}
    config.optimizer.learning_rate = 3e-3
    config.num_steps = 600
    return config
