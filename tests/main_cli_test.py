"""experiments/main.py explains a bad command-line override in one line."""

import subprocess
import sys

import pytest

# ml_collections registers the --config.<field> flags from sys.argv, and absl's
# flags are process-global: each command line is parsed in a fresh process.
_SCRIPT = """
import sys
from absl import flags
from experiments import main
try:
    main.parse_flags(sys.argv)
    print("parsed, verbosity", flags.FLAGS.verbosity)
except SystemExit as e:
    print(e.code)
"""

_ACCEPTS = "an integer in [0, 16] (0 keeps weights float)"


@pytest.mark.parametrize(
    ("override", "outcome"),
    [
        (
            "--config.quant.weight_bits=4.5",
            "FATAL --config.quant.weight_bits=4.5: config.quant.weight_bits must be "
            f"{_ACCEPTS}, got '4.5'",
        ),
        (
            "--config.quant.weight_bitz=3",
            "FATAL --config.quant.weight_bitz: the config has no field 'weight_bitz' "
            "(did you mean 'weight_bits'?)",
        ),
        # absl would raise the verbosity to INFO (orbax's per-checkpoint log lines).
        ("--config.seed=1", "parsed, verbosity -1"),
    ],
)
def test_overrides_are_explained_in_one_line(override, outcome):
    argv = ["--config=experiments/configs/digits_student.py", "--workdir=w", override]
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *argv], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == outcome
