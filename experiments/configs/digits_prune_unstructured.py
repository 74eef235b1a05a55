"""Unstructured magnitude pruning of the float CNN, with or without KD recovery.

The argument is the final sparsity, optionally followed by ",kd":

    --config=experiments/configs/digits_prune_unstructured.py:0.9,kd

Starts from the float CNN (`--config.init_from`) and prunes its two large
layers, Conv_1 and Dense_0 (96% of its weights); the first conv (9 weights
per filter) and the classifier stay dense, as is usual. Sparsity grows from 0
to the target over steps 0..300 (Zhu & Gupta's cubic schedule, masks updated
every 20 steps) and training continues to step 600 with the masks fixed.
With ",kd" the dense float CNN is the teacher (0.5 CE + 0.5 KD).
"""

from experiments.configs import digits_teacher


def get_config(arg: str = "0.5"):
    sparsity, _, kd = arg.partition(",")
    if kd not in ("", "kd"):
        raise ValueError(f"config argument must be '<sparsity>' or '<sparsity>,kd', got {arg!r}")
    config = digits_teacher.get_config()
    config.init_from = "runs/digits_teacher"
    config.prune.structure = "unstructured"
    config.prune.sparsity = float(sparsity)
    config.prune.regex = "(Conv_1|Dense_0)/kernel"
    config.prune.schedule = "polynomial"
    config.prune.begin, config.prune.end, config.prune.frequency = 0, 300, 20
    config.optimizer.learning_rate = 1e-3
    config.num_steps = 600
    if kd:
        config.teacher.name = config.model.name
        config.teacher.options = config.model.options
        config.teacher.workdir = "runs/digits_teacher"
        config.losses = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 2.0}}
    return config
