"""Prune -> quantize -> distil: the CNN at 2:4 sparsity with 4-bit weights, KD from its dense float self.

Starts from the float CNN (`--config.init_from`); 2:4 masks (2 of every 4
weights along the input axis) are set at step 0 and kept by the optax pruning
transform; weights are fake-quantized to 4 bits per channel (a pruned zero
stays exactly zero); the dense float CNN is the teacher. The first conv
(one input channel, so no groups of 4) stays dense.
"""

from experiments.configs import digits_teacher


def get_config():
    config = digits_teacher.get_config()
    config.init_from = "runs/digits_teacher"
    config.teacher.name = config.model.name
    config.teacher.options = config.model.options
    config.teacher.workdir = "runs/digits_teacher"
    config.losses = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 2.0}}
    config.prune.structure = "n:m"
    config.prune.n, config.prune.m = 2, 4
    config.prune.regex = "(Conv_1|Dense_0|Dense_1)/kernel"
    config.quant.weight_bits = 4
    config.optimizer.learning_rate = 1e-3
    config.num_steps = 400
    return config
