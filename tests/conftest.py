"""Suite-wide setup: datasets are built into a temporary directory, not ~/.cache.

The tests compile far more XLA programs than they run steps, so XLA's CPU
backend is told to spend less time optimising generated code (about a third
less time per test); set before any test module imports jax.
"""

import os
import tempfile

FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_FLAGS]).strip()

_DATA_DIR = tempfile.mkdtemp(prefix="kdq-test-data-")


def pytest_configure(config):
    os.environ.setdefault("KDQ_DATA_DIR", _DATA_DIR)
