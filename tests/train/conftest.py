"""Fixtures of the end-to-end training tests."""

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

_CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture
def shared_compilations(tmp_path_factory):
    """A persistent XLA compilation cache private to one test.

    The runs of one config inside a test build the same programs (train, eval and
    integer steps); with the cache each is compiled once and loaded afterwards, which
    changes no number, only the time. The previous settings are restored afterwards.
    """
    previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    options = {**_CACHE_OPTIONS, "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla"))}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
