"""The teacher: a CNN trained on the embedded digits with cross-entropy."""

from kdq.train import default_config


def get_config():
    config = default_config()
    config.model.name = "cnn"
    config.model.options = {"channels": (32, 64), "dense": 128}
    return config
