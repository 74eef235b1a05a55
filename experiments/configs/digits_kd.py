"""The MLP student distilled from the CNN teacher: 0.5 cross-entropy + 0.5 KD.

KD uses logit standardisation (Sun et al. 2024) at T = 2, chosen on
validation among plain and standardised KD at T = 1, 2, 4 (97.05 % against
96.70 % for the best plain KD, mean of seeds 0 and 1; T = 1 ties on accuracy
and loses on validation loss; `experiments/select_recipes.py`). The teacher's run
directory is `--config.teacher.workdir` (default runs/digits_teacher: train
it first with digits_teacher.py).
"""

from experiments.configs import digits_student, digits_teacher


def get_config():
    config = digits_student.get_config()
    teacher = digits_teacher.get_config()
    config.teacher.name = teacher.model.name
    config.teacher.options = teacher.model.options
    config.teacher.workdir = "runs/digits_teacher"
    config.losses = {
        "ce": {"weight": 0.5},
        "kd": {"weight": 0.5, "temperature": 2.0, "standardize": True},
    }
    return config
