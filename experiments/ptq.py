"""Post-training quantization of a finished float run (`kdq.train.quantize_and_evaluate`).

    python -m experiments.ptq --config=experiments/configs/digits_ptq_w8a8.py \\
        --workdir=runs/ptq_w8a8 --config.init_from=runs/digits_teacher

The same flags as `experiments.main`, for configs with `config.entry_point =
"ptq"`; nothing is trained: the float model of `--config.init_from` is
calibrated on a few train batches, evaluated (also on the integer path) and
exported.
"""

from absl import app

from experiments import main as cli
from kdq.train import quantize_and_evaluate


def main(argv):
    del argv
    cli.run(quantize_and_evaluate)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
