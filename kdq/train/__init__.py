"""Training: builders, state, the jitted teacher/student step, and the run entry points.

setup = build(config, dataset)            # every part of a run, built once
state = create_train_state(config, setup)
train_and_evaluate(config, workdir, dataset=None)   # train, evaluate, export
quantize_and_evaluate(config, workdir, dataset=None) # post-training quantization
"""

from kdq.train.config import build_model, default_config, pruning, quant_recipe, validate
from kdq.train.evaluation import evaluate, export_and_evaluate
from kdq.train.loop import NonFiniteLossError, train_and_evaluate
from kdq.train.metrics import MetricWriter
from kdq.train.optim import learning_rate_schedule, make_optimizer
from kdq.train.ptq import quantize_and_evaluate
from kdq.train.setup import Setup, build, create_train_state
from kdq.train.state import TRAINABLE, TrainState
from kdq.train.step import make_eval_step, make_train_step

__all__ = [
    "TRAINABLE",
    "MetricWriter",
    "NonFiniteLossError",
    "Setup",
    "TrainState",
    "build",
    "build_model",
    "create_train_state",
    "default_config",
    "evaluate",
    "export_and_evaluate",
    "learning_rate_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "pruning",
    "quant_recipe",
    "quantize_and_evaluate",
    "train_and_evaluate",
    "validate",
]
