"""Benchmarks of kdq against its JAX peers; see experiments/bench/README.md."""
