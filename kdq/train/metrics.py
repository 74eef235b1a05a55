"""Scalar metrics of a run, to TensorBoard event files (no TensorFlow) and metrics.jsonl."""

from __future__ import annotations

import json
import os

import tensorboardX


class MetricWriter:
    """Writes named scalars at a step to `<workdir>/tensorboard` and `<workdir>/metrics.jsonl`.

    Train, validation and test metrics all go through it: "train/loss",
    "val/accuracy", "test/accuracy", ... One JSON object per `write`:
    {"step": step, name: value, ...}, appended (a resumed run continues the file).
    """

    def __init__(self, workdir: str):
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Writes every scalar of `scalars` at `step`, then flushes both files."""
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._tb.close()
        self._jsonl.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
