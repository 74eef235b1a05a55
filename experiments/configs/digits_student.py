"""The student alone: a small MLP (one hidden layer of 32) trained with cross-entropy."""

from kdq.train import default_config


def get_config():
    config = default_config()
    config.model.name = "mlp"
    config.model.options = {"hidden": (32,)}
    config.num_steps = 1500
    return config
