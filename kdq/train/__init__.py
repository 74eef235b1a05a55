"""Training: state, the jitted teacher/student step, and the run loop."""

from kdq.train.config import default_config, quant_recipe
from kdq.train.loop import NonFiniteLossError, make_optimizer, train_and_evaluate
from kdq.train.state import TrainState
from kdq.train.step import make_eval_step, make_train_step

__all__ = [
    "NonFiniteLossError",
    "TrainState",
    "default_config",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "train_and_evaluate",
    "quant_recipe",
]
