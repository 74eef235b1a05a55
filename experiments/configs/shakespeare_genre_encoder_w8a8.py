"""The genre encoder with 8-bit weights and 8-bit per-token activations (QAT from scratch).

Every projection of the encoder (attention q/k/v/o, MLP up/down, the head)
has 8-bit per-channel weights and 8-bit inputs quantized per token from the
current batch; embeddings and LayerNorms stay float.
"""

from experiments.configs import shakespeare_genre_encoder


def get_config():
    config = shakespeare_genre_encoder.get_config()
    config.quant.weight_bits = 8
    config.quant.weight_regex = ".*(attn|mlp)/.*kernel|head/kernel"
    config.quant.act_bits = 8
    config.quant.act_regex = ".*(attn|mlp)/.*"
    config.quant.act_per_token = True
    return config
