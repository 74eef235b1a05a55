"""The student distilled from the CNN teacher (Hinton KD + cross-entropy).

The teacher's run directory is `--config.teacher.workdir` (default
runs/digits_teacher: train it first with digits_teacher.py).
"""

from kdq.train import default_config

STUDENT = {"name": "mlp", "options": {"hidden": (32,)}}


def get_config():
    config = default_config()
    config.model.name = STUDENT["name"]
    config.model.options = STUDENT["options"]
    config.teacher.name = "cnn"
    config.teacher.options = {"channels": (32, 64), "dense": 128}
    config.teacher.workdir = "runs/digits_teacher"
    config.losses = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 4.0}}
    return config
