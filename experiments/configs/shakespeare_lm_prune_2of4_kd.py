"""The distilled student pruned to 2:4 sparsity in every projection kernel.

It trains dense with the KD objective of shakespeare_lm_kd.py for the first
third of its steps; then, once, two of every four consecutive weights along
each projection kernel's input axis are kept (the largest in magnitude: the
pattern sparse tensor cores run) and the pruned ones stay exactly zero for
the rest of training.
"""

from experiments.configs import shakespeare_lm_kd


def get_config():
    config = shakespeare_lm_kd.get_config()
    config.prune.structure = "n:m"
    config.prune.n = 2
    config.prune.m = 4
    config.prune.regex = ".*(attn|mlp)/.*kernel"
    config.prune.begin = config.num_steps // 3
    return config
