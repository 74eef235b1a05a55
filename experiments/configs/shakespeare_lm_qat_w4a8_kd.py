"""The distilled student with 4-bit weights (groups of 32) and 8-bit per-token activations.

Every projection kernel (attention q/k/v/o, MLP gate/up/down) is quantized
symmetrically per output channel in groups of 32 inputs along its contraction
axis; the inputs of those projections are quantized per token from the
current batch (dynamic). The byte embedding, which is also the tied output
projection, stays float. Trained with the KD objective of shakespeare_lm_kd.py.
"""

from experiments.configs import shakespeare_lm_kd


def get_config():
    config = shakespeare_lm_kd.get_config()
    config.quant.weight_bits = 4
    config.quant.group_size = 32
    config.quant.weight_regex = ".*(attn|mlp)/.*kernel"
    config.quant.act_bits = 8
    config.quant.act_regex = ".*(attn|mlp)/.*"
    config.quant.act_per_token = True
    return config
