"""Suite-wide setup: datasets are built into a temporary directory, not ~/.cache."""

import os
import tempfile

_DATA_DIR = tempfile.mkdtemp(prefix="kdq-test-data-")


def pytest_configure(config):
    os.environ.setdefault("KDQ_DATA_DIR", _DATA_DIR)
