"""The LM post-training-quantization benchmark: its metric, its rows and its goal arithmetic.

The metric is checked against a numpy log-softmax of the same logits; the
goal arithmetic on rows with hand-computable figures.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from experiments.bench import ptq_transformers as bench
from kdq.models import create_model


def _row(library, method, bits, group, act=None, bpb=2.0, seconds=1.0, kv=None):
    return dict(
        library=library,
        method=method,
        weight_bits=bits,
        group_size=group,
        act_bits=act,
        kv_cache_bits=kv,
        test_bits_per_byte=bpb,
        calibration_s=seconds,
        peak_rss_mib=100.0,
    )


def test_bits_per_byte_is_the_masked_cross_entropy_in_bits():
    model = create_model(
        "lm_tiny", num_classes=256, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=16
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(300, 9)).astype(np.int32)  # two chunks, the last short
    where = rng.random((300, 8)) < 0.7
    variables = model.init(jax.random.PRNGKey(0), tokens[:1, :-1])
    forward = jax.jit(model.apply)
    measured = bench.bits_per_byte(lambda x: forward(variables, x), (tokens, where))

    logits = np.asarray(forward(variables, tokens[:, :-1]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    expected = -picked[where].mean() / math.log(2)
    assert measured == pytest.approx(expected, rel=1e-5)


def test_cases_cover_every_recipe_and_method_and_qwix_has_no_3_bit_gptq():
    cases = list(bench.cases())
    assert len(cases) == len(set(cases)) == 3 * 6 + 3 * 3 - 1 + 3 + 2
    assert ("qwix", "gptq", 3, 128, None) not in cases
    for bits, group in bench.WEIGHT_ONLY.values():
        for method in bench.KDQ_WEIGHT_ONLY:
            assert ("kdq", method, bits, group, None) in cases
        for method in bench.QWIX_WEIGHT_ONLY:
            assert (("qwix", method, bits, group, None) in cases) == (
                not (method == "gptq" and bits == 3)
            )
    for method in bench.KDQ_W8A8:
        assert ("kdq", method, 8, None, 8) in cases
    assert {c for c in cases if c[0] == "qwix" and c[4] == 8} == {
        ("qwix", m, 8, None, 8) for m in bench.QWIX_W8A8
    }
    # every Qwix row has its kdq counterpart, so each comparison goal is defined
    for library, method, bits, group, act in cases:
        if library == "qwix":
            assert ("kdq", bench.KDQ_COUNTERPART[method], bits, group, act) in cases
    assert bench.KDQ_WEIGHT_ONLY["gptq-no-act-order"].gptq_act_order is False


def test_kdq_recipe_quantizes_block_kernels_per_group_and_inputs_per_token():
    weight_only = bench.kdq_recipe(3, 128, None)
    ((pattern, spec),) = weight_only.weight_rules
    assert pattern == bench.KERNELS and (spec.bits, spec.group_size, spec.axes) == (3, 128, (-1,))
    assert not weight_only.quantizes_activations
    w8a8 = bench.kdq_recipe(8, None, 8)
    ((_, act),) = w8a8.act_rules
    assert (act.bits, act.axes, w8a8.act_mode) == (8, (0, 1), "dynamic")


def _rows():
    rows = [_row("kdq", "float", None, None, bpb=2.0, seconds=0.0)]
    rows.append(_row("kdq", "float", None, None, bpb=2.01, seconds=0.0, kv=8))
    for bits, group in bench.WEIGHT_ONLY.values():
        rows.append(_row("kdq", "rtn", bits, group, bpb=2.4))
        rows.append(_row("kdq", "gptq", bits, group, bpb=2.1, seconds=30.0))
        rows.append(_row("kdq", "awq", bits, group, bpb=2.3))
        rows.append(_row("kdq", "gptq-no-act-order", bits, group, bpb=2.15, seconds=20.0))
    rows.append(_row("qwix", "gptq", 4, 128, bpb=2.2, seconds=60.0))
    rows.append(_row("qwix", "smoothquant", 8, None, act=8, bpb=2.0, seconds=4.0))
    rows.append(_row("kdq", "rtn", 8, None, act=8, bpb=2.05))
    rows.append(_row("kdq", "smoothquant", 8, None, act=8, bpb=2.01))
    return rows


def test_goals_compute_the_gap_closed_and_the_ratios_to_qwix():
    rows = _rows()
    assert bench.gap_closed(rows, "W4 g128") == pytest.approx((2.4 - 2.1) / (2.4 - 2.0))
    checks = {g["goal"]: g for g in bench.goals(rows)}
    assert checks["kdq GPTQ closes RTN's gap to float, W3 g128"]["value"] == pytest.approx(0.75)
    assert checks["kdq GPTQ closes RTN's gap to float, W3 g128"]["direction"] == ">="
    assert checks["kdq AWQ - RTN bits/byte, W4 g128"]["value"] == pytest.approx(-0.1)
    assert checks["kdq SmoothQuant W8A8 / float - 1"]["value"] == pytest.approx(0.005)
    assert checks["kdq SmoothQuant - naive W8A8 bits/byte"]["value"] == pytest.approx(-0.04)
    # Qwix's GPTQ (natural column order) against kdq's in the same order
    assert checks["kdq - Qwix bits/byte, gptq W4 g128"]["value"] == pytest.approx(-0.05)
    assert checks["kdq / Qwix calibration time, gptq W4 g128"]["value"] == pytest.approx(1 / 3)
    assert checks["kdq - Qwix bits/byte, smoothquant W8A8"]["value"] == pytest.approx(0.01)
    assert checks["kdq / Qwix calibration time, smoothquant W8A8"]["value"] == pytest.approx(0.25)
    assert checks["kdq GPTQ W4 g128 calibration (s)"]["value"] == 30.0
    for name, check in checks.items():
        assert check["direction"] == (">=" if "closes" in name else "<="), name


def test_table_labels_recipes_and_differences_to_float():
    table = bench.format_table({"figures": _rows()}).splitlines()
    assert table[0].split() == [
        "recipe",
        "library",
        "method",
        "test",
        "bpb",
        "vs",
        "float",
        "calib",
        "s",
    ]
    assert table[2].split() == ["KV8", "kdq", "float", "2.0100", "+0.0100", "0.0"]
    assert table[4].split() == ["W4", "g128", "kdq", "gptq", "2.1000", "+0.1000", "30.0"]
    assert table[-1].split() == ["W8A8", "kdq", "smoothquant", "2.0100", "+0.0100", "1.0"]
    assert table[-3].split() == ["W8A8", "qwix", "smoothquant", "2.0000", "+0.0000", "4.0"]
    assert table[-4].split() == ["W4", "g128", "qwix", "gptq", "2.2000", "+0.2000", "60.0"]
