"""Runs one kdq experiment.

    python -m experiments.main --config=experiments/configs/digits_kd.py \
        --workdir=runs/kd --config.seed=1
"""

from absl import app, flags, logging
from ml_collections import config_flags

from kdq.sharding import initialize_distributed
from kdq.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it holds a run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if _CONFIG.value.distributed:
        initialize_distributed()
    report = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(f"test accuracy {report['test_accuracy']:.4f}, model {report['checkpoint_bytes']} bytes")


if __name__ == "__main__":
    flags.FLAGS.set_default("verbosity", logging.WARNING)
    app.run(main)
