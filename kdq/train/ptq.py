"""`quantize_and_evaluate(config, workdir, *, dataset=None)`: post-training quantization as a run.

The float model of `config.init_from` (a finished run's export) is quantized
by the config's recipe without training: weights by their specs'
calibration, static activation ranges measured on the first
`config.quant.calibration_batches` train batches with the quantized weights
in place (`kdq.quant.init_quant_params`, what `kdq.quant.ptq` does). The
result is evaluated (validation, test, and the integer path on test) and
exported exactly like a trained run, into the same files: config.json,
metrics.jsonl, tensorboard/, model/, model.json, report.json.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from kdq.data import Dataset
from kdq.quant.quantizers import act_quantizer, weight_quantizer
from kdq.quant.recipe import PTQ_ACT_MODES, PTQ_WEIGHT_MODES
from kdq.train.config import validate
from kdq.train.evaluation import check_integer_path, finish_run, progress_bar
from kdq.train.metrics import MetricWriter
from kdq.train.setup import build, create_train_state
from kdq.train.workdir import check_resumable, write_config


def _check_ptq_config(config: ml_collections.ConfigDict) -> None:
    """ValueError unless the config names a float run and quantizers that learn nothing."""
    if not config.init_from:
        raise ValueError(
            "post-training quantization quantizes a trained float model: set "
            "config.init_from to the workdir of a finished float run"
        )
    quant = config.quant
    if not (quant.weight_bits or quant.act_bits):
        raise ValueError(
            "config.quant.weight_bits and config.quant.act_bits are both 0, so there is "
            "nothing to quantize; set either"
        )
    learned = [
        f"{name}={mode!r}"
        for name, mode, bits, quantizer in (
            ("weight_mode", quant.weight_mode, quant.weight_bits, weight_quantizer),
            ("act_mode", quant.act_mode, quant.act_bits, act_quantizer),
        )
        if bits and quantizer(mode).learned
    ]
    if learned:
        raise ValueError(
            f"post-training quantization trains nothing, but config.quant has learned "
            f"quantizers ({', '.join(learned)}); use quantizers without learned state "
            f"(weight_mode in {PTQ_WEIGHT_MODES}, act_mode in {PTQ_ACT_MODES}), or train "
            "them with train_and_evaluate"
        )


def quantize_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, dataset: Dataset | None = None
) -> dict[str, Any]:
    """Quantizes the float model of `config.init_from` without training, evaluates and exports it.

    Args:
      config: a config built on `kdq.train.default_config()` whose quant
        section asks for calibrated weights and static or dynamic activations
        (e.g. experiments/configs/digits_ptq_w8a8.py).
      workdir: the run directory (written like a training run's).
      dataset: the data to calibrate and evaluate on instead of `config.dataset`.

    Returns:
      The report (also workdir/report.json): the fields of a training run's,
      with "steps" 0.
    """
    validate(config)
    _check_ptq_config(config)
    workdir, current, new_run = check_resumable(config, workdir, "ptq", dataset)
    with progress_bar(config, workdir, total=None) as progress:
        setup = build(config, dataset)
        state = create_train_state(config, setup)
        check_integer_path(setup, state, config.batch_size)
        if new_run:
            write_config(workdir, current)
        with MetricWriter(workdir) as writer:
            return finish_run(config, workdir, setup, state, writer, progress, train_seconds=0.0)
