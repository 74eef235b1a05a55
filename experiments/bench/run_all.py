"""Runs every benchmark in one process, one after the other (`make bench`).

Each benchmark prints its table and writes <out-dir>/<name>.json; then every
goal check is printed together and written to <out-dir>/summary.json with the
machine, the versions and the wall time of each benchmark. An option given
here goes to every benchmark that takes it; the others keep their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

from experiments.bench import common

SCRIPTS = (
    "qat_overhead",
    "peers",
    "distill_overhead",
    "integer_inference",
    "compile_time",
    "lm_steps",
    "lm_generation",
    "ptq_transformers",
)


def main(argv=None) -> dict:
    """Runs the benchmarks; returns the summary document."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_options(p, common.OPTIONS, default=None)
    p.add_argument("--out-dir", default=os.path.join("runs", "bench"))
    args = p.parse_args(argv)

    environment = common.environment()
    print(environment)
    files, documents, seconds = {}, {}, {}
    for script in SCRIPTS:
        benchmark = importlib.import_module(f"experiments.bench.{script}").BENCHMARK
        start, files[script] = time.perf_counter(), os.path.join(args.out_dir, f"{script}.json")
        given = {k: getattr(args, k) for k in benchmark.options if getattr(args, k) is not None}
        documents[script] = benchmark.main(["--out", files[script]], **given)
        seconds[script] = time.perf_counter() - start

    goals = [g for document in documents.values() for g in document["goals"]]
    print(f"\n== Goals\n{common.goals_table(goals)}")
    print("wall time (s): " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()))
    summary = {**environment, "seconds": seconds, "files": files, "goals": goals}
    common.write(summary, os.path.join(args.out_dir, "summary.json"))
    return summary


if __name__ == "__main__":
    main()
