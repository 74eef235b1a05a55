"""The student alone: a small MLP trained on digits with cross-entropy."""

from kdq.train import default_config

STUDENT = {"name": "mlp", "options": {"hidden": (32,)}}


def get_config():
    config = default_config()
    config.model.name = STUDENT["name"]
    config.model.options = STUDENT["options"]
    return config
