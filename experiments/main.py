"""Runs one kdq experiment: trains, evaluates and exports (`kdq.train.train_and_evaluate`).

    python -m experiments.main --config=experiments/configs/digits_kd.py \
        --workdir=runs/kd --config.seed=1

Post-training quantization has its own entry point with the same flags,
`python -m experiments.ptq` (`kdq.train.quantize_and_evaluate`).

A command-line override that does not fit its field (`--config.quant.weight_bits=4.5`),
a misspelled field, or a config value out of its range, stops the run with one line
naming the field, what it accepts and what was given, before anything is loaded or
compiled. What only building shows (a recipe or pruning rule that selects nothing, a
model option) raises a ValueError naming the config section, before any data is loaded.
A config written for the other entry point (`config.entry_point`) is refused.
"""

import re
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from kdq.sharding import initialize_distributed
from kdq.train import train_and_evaluate
from kdq.train.config import FIELDS, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it holds a run).")
flags.mark_flags_as_required(["config", "workdir"])


def override_error(error: Exception, argv: list[str]) -> str | None:
    """One line explaining a bad `--config.<field>=<value>` override, or None if it is not one.

    Args:
      error: what parsing the flags raised.
      argv: the command line parsed.

    Returns:
      E.g. "--config.quant.weight_bits=4.5: config.quant.weight_bits must be an
      integer in [0, 16] (0 keeps weights float), got '4.5'".
    """
    text = str(error)
    match = re.search(r"--config\.([\w.]+)=(.*?): ", text)
    if match:
        path, value = match.groups()
        field = FIELDS.get(path)
        if field is not None:
            return (
                f"--config.{path}={value}: config.{path} must be {field.describe()}, got {value!r}"
            )
        return f"--config.{path}={value}: {text[match.end() :]}"
    if isinstance(error, AttributeError | KeyError):
        # ml_collections names the missing key, and a close one, in its message.
        unknown = re.search(r"(\w+)\W*(?:\\n|\s)*Did you mean\W+(\w+)", text)
        key = unknown.group(1) if unknown else re.sub(r"\W", "", text)
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [a for a in overrides if a.rsplit(".", 1)[-1] == key] or overrides
        suggestion = f" (did you mean {unknown.group(2)!r}?)" if unknown else ""
        return f"{', '.join(named)}: the config has no field {key!r}{suggestion}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line message for a bad config override.

    Without `--verbosity`, absl would log at INFO once flags are parsed, and
    orbax logs a dozen INFO lines per checkpoint: warnings and errors only.
    """
    try:
        remaining = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        message = override_error(e, argv)
        if message is None:
            raise
        sys.exit(f"FATAL {message}")
    if flags.FLAGS["verbosity"].using_default_value:
        flags.FLAGS.verbosity = logging.WARNING
    return remaining


def summary_line(report: dict) -> str:
    """The report's split metrics and the model's size, e.g. "val_accuracy 0.9769, ..."."""
    metrics = [
        f"{name} {value:.4f}"
        for name, value in report.items()
        if name.startswith(("val_", "test_")) and isinstance(value, float)
    ]
    return (
        f"{', '.join(metrics)}; model payload {report['payload_bytes']} bytes "
        f"({report['disk_bytes']} on disk)"
    )


def run(entry_point: Callable[..., dict]) -> None:
    """Validates the config (one FATAL line when it is wrong), runs `entry_point`, prints a summary."""
    config = _CONFIG.value
    try:
        validate(config)
    except ValueError as e:
        sys.exit(f"FATAL {e}")
    if config.distributed:
        initialize_distributed()
    print(summary_line(entry_point(config, _WORKDIR.value)))


def main(argv):
    del argv
    run(train_and_evaluate)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
