"""The student language model alone: a 4-layer transformer of width 32 (0.27x the teacher).

The teacher's architecture (`shakespeare_lm_teacher.py`) at half the width:
2 query heads of 16 dimensions sharing one key/value head, SwiGLU width 96;
57,632 parameters against the teacher's 213,568. Trained with cross-entropy
only, for the teacher's number of steps: the baseline the distilled
students are compared with.
"""

from experiments.configs import shakespeare_lm_teacher

STUDENT_OPTIONS = {
    "num_layers": 4,
    "d_model": 32,
    "num_heads": 2,
    "num_kv_heads": 1,
    "mlp_dim": 96,
    "max_len": 256,
}


def get_config():
    config = shakespeare_lm_teacher.get_config()
    config.model.name = "transformer_lm"
    config.model.options = dict(STUDENT_OPTIONS)
    return config
