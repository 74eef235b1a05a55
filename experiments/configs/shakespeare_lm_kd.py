"""The student distilled from the teacher LM: 0.5 cross-entropy + 0.5 forward KL per byte.

The teacher's run directory is `--config.teacher.workdir` (default
runs/lm_teacher: train it first with shakespeare_lm_teacher.py).
"""

from experiments.configs import shakespeare_lm_student, shakespeare_lm_teacher


def get_config():
    config = shakespeare_lm_student.get_config()
    teacher = shakespeare_lm_teacher.get_config()
    config.teacher.name = teacher.model.name
    config.teacher.options = teacher.model.options
    config.teacher.workdir = "runs/lm_teacher"
    config.losses = {
        "ce": {"weight": 0.5},
        "kd": {"kind": "forward_kl", "weight": 0.5, "temperature": 1.0},
    }
    return config
