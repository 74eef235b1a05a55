"""Runs every benchmark in one process, one after the other (`make bench`).

    python -m experiments.bench.run_all [--repeats N] [--compile-repeats N]
        [--steps 300] [--seeds 0 1 2] [--out-dir runs/bench]

Each benchmark prints its table and writes <out-dir>/<name>.json; then every
goal check is printed together and written to <out-dir>/summary.json with the
machine, the versions and the wall time of each benchmark.
"""

from __future__ import annotations

import argparse
import os
import time

from experiments.bench import (
    common,
    compile_time,
    distill_overhead,
    integer_inference,
    peers,
    qat_overhead,
)

TIMED = (qat_overhead, peers, distill_overhead, integer_inference)


def main(argv=None) -> dict:
    """Runs the benchmarks; returns the summary document."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=None, help="timed samples per figure")
    p.add_argument("--compile-repeats", type=int, default=None, help="compiles per step")
    p.add_argument("--steps", type=int, default=300, help="training steps of the accuracy runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out-dir", default=os.path.join("runs", "bench"))
    args = p.parse_args(argv)

    print("machine:", common.machine())
    print("versions:", common.versions())
    documents, seconds = {}, {}
    for module in (*TIMED, compile_time):
        options = ["--out", os.path.join(args.out_dir, f"{module.NAME}.json")]
        repeats = args.compile_repeats if module is compile_time else args.repeats
        if repeats is not None:
            options += ["--repeats", str(repeats)]
        if module is peers:
            options += ["--steps", str(args.steps), "--seeds", *map(str, args.seeds)]
        start = time.perf_counter()
        documents[module.NAME] = module.main(options)
        seconds[module.NAME] = time.perf_counter() - start

    goals = [g for document in documents.values() for g in document["goals"]]
    print("\n== Goals")
    print(common.goals_table(goals))
    print("wall time (s): " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()))
    summary = {
        "machine": common.machine(),
        "versions": common.versions(),
        "seconds": seconds,
        "files": {name: os.path.join(args.out_dir, f"{name}.json") for name in documents},
        "goals": goals,
    }
    common.write(summary, os.path.join(args.out_dir, "summary.json"))
    return summary


if __name__ == "__main__":
    main()
