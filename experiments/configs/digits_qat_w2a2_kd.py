"""QAT of the CNN at 2-bit weights and activations (LSQ), distilled from its float self.

As usual below 4 bits, the first layer (whose input is the image) and the
last layer keep 8-bit weights and inputs; every other layer is 2-bit. The
objective is the 4-bit one (0.5 KD + 0.5 CE at T = 2): chosen on validation
over 0.8 KD + 0.2 CE (97.05 % against 96.01 %, mean of seeds 0 and 1;
`experiments/select_recipes.py`).
"""

from experiments.configs import digits_qat_w4a4_kd


def get_config():
    config = digits_qat_w4a4_kd.get_config(bits=2)
    config.quant.edge_layers = "Conv_0|Dense_1"
    config.optimizer.learning_rate = 3e-3
    config.num_steps = 600
    return config
