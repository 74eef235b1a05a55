"""The quantizer registry: one module per mode, and a mode registered from outside kdq."""

from __future__ import annotations

import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdq.quant.quantizers as quantizers
from kdq.models import create_model
from kdq.quant import (
    QuantRecipe,
    QuantSpec,
    apply_quantized,
    fake_quant,
    fake_quant_apply,
    init_quant_params,
    integer_apply,
    ptq,
    quantize,
    quantizer_penalties,
    to_qat_state,
    to_quantized_model,
)
from kdq.quant.recipe import ACT_MODES, PTQ_ACT_MODES, PTQ_WEIGHT_MODES, WEIGHT_MODES


def test_every_module_of_the_package_registers_its_modes():
    modules = {
        f"kdq.quant.quantizers.{m.name}"
        for m in pkgutil.iter_modules(quantizers.__path__)
        if m.name != "base"
    }
    registered = {
        type(q).__module__
        for registry in (quantizers.ACT_QUANTIZERS, quantizers.WEIGHT_QUANTIZERS)
        for q in registry.values()
    }
    assert registered == modules
    assert sorted(ACT_MODES) == ["dynamic", "lsq", "pact", "static"]
    assert sorted(WEIGHT_MODES) == ["calibrated", "lsq"]
    assert sorted(PTQ_ACT_MODES) == ["dynamic", "static"] and PTQ_WEIGHT_MODES == ("calibrated",)
    for name, q in quantizers.ACT_QUANTIZERS.items():
        assert q.name == name and q.learned == (name in ("lsq", "pact"))
        assert q.needs_calibration == (name != "dynamic")


def test_unknown_modes_and_bad_registrations_are_rejected():
    with pytest.raises(ValueError, match=r"act_mode must be one of \('dynamic', 'lsq', 'pact', "):
        QuantRecipe(act_mode="nope")
    with pytest.raises(ValueError, match=r"weight_mode must be one of .*got weight_mode='x'"):
        QuantRecipe(weight_mode="x")
    with pytest.raises(ValueError, match=r"act_mode 'pact' is already registered"):
        quantizers.register(type(quantizers.ACT_QUANTIZERS["pact"])())
    with pytest.raises(ValueError, match=r"must be an ActQuantizer or a WeightQuantizer"):
        quantizers.register(object())
    with pytest.raises(ValueError, match=r"ptq needs quantizers without learned state"):
        ptq(None, {}, [], QuantRecipe(act_mode="lsq"))


# ------------------------------------------------- a mode defined outside kdq


class Doubled(quantizers.ActQuantizer):
    """Static ranges twice as wide as calibrated: s = 2 s_cal, per tensor."""

    name = "doubled"

    def check_spec(self, rules_name, pattern, spec):
        if spec.axes:
            raise ValueError(f"{rules_name} {pattern!r}: doubled is per tensor")

    def init(self, spec, calibration, path, *, lsq_init):
        return {"scale": 2.0 * calibration.range(path)["scale"]}

    def apply(self, x, spec, state, *, key, path):
        return fake_quant(x, spec, scale=state["scale"])

    def export(self, state, spec, path):
        return {"scale": state["scale"]}

    def from_export(self, exported, spec):
        return {"scale": exported["scale"]}

    def penalties(self, act_state, recipe):
        scales = jax.tree_util.tree_leaves(act_state)
        return {"doubled_scale": sum(jnp.sum(s) for s in scales)}


class PowerOfTwo(quantizers.WeightQuantizer):
    """Weights with the per-tensor scale 2^ceil(log2(max|w| / qmax))."""

    name = "power_of_two"

    def init(self, w, spec, *, lsq_init):
        return None

    def _scale(self, w, spec):
        return 2.0 ** jnp.ceil(jnp.log2(jnp.max(jnp.abs(w)) / spec.qmax)).reshape(1, 1)

    def apply(self, w, spec, state, *, key, path):
        return fake_quant(w, spec, scale=self._scale(w, spec))

    def export(self, w, spec, state, path):
        return quantize(w, spec, scale=self._scale(w, spec))

    def from_export(self, q):
        return None


@pytest.fixture
def registered():
    act, weight = quantizers.register(Doubled()), quantizers.register(PowerOfTwo())
    yield act, weight
    del quantizers.ACT_QUANTIZERS[act.name], quantizers.WEIGHT_QUANTIZERS[weight.name]


def _reference(variables, x, act_scales, bits):
    """numpy MLP forward: per-tensor symmetric fake quant of each Dense input and kernel."""
    p = variables["params"]
    qmax = 2 ** (bits - 1) - 1

    def fq(v, s):
        return np.clip(np.round(v / s), -qmax - 1, qmax) * s

    def pow2(w):
        return fq(w, 2.0 ** np.ceil(np.log2(np.abs(w).max() / qmax)))

    h = x.reshape(x.shape[0], -1).astype(np.float64)
    h = fq(h, act_scales[0]) @ pow2(np.asarray(p["Dense_0"]["kernel"], np.float64))
    h = np.maximum(h + p["Dense_0"]["bias"], 0)
    return (
        fq(h, act_scales[1]) @ pow2(np.asarray(p["Dense_1"]["kernel"], np.float64))
        + p["Dense_1"]["bias"]
    )


def test_a_mode_registered_in_a_test_runs_through_init_apply_and_export(registered):
    model = create_model("mlp", num_classes=3, hidden=(6,))
    x = np.random.default_rng(3).normal(size=(16, 2, 2, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    rules = dict(act_rules=[(".*", QuantSpec(bits=6))])
    recipe = QuantRecipe(
        weight_rules=[(".*kernel", QuantSpec(bits=6))],
        weight_mode="power_of_two",
        act_mode="doubled",
        **rules,
    )
    with pytest.raises(ValueError, match=r"act_rules '\.\*': doubled is per tensor"):
        QuantRecipe(act_rules=[(".*", QuantSpec(axes=(0,)))], act_mode="doubled")

    state = init_quant_params(model, variables, recipe, [x])
    static = init_quant_params(
        model,
        variables,
        QuantRecipe(weight_rules=recipe.weight_rules, act_mode="static", **rules),
        [x],
    )
    # Dense_0's input is x itself: its calibrated scale is max|x| / qmax.
    np.testing.assert_allclose(
        state["activations"]["Dense_0"]["scale"], 2 * np.abs(x).max() / 31, rtol=1e-6
    )
    assert state["weights"] == {}
    scales = [float(state["activations"][p]["scale"]) for p in ("Dense_0", "Dense_1")]
    assert scales[1] > 0 and static["activations"]["Dense_0"]["scale"] * 2 == scales[0]

    logits = np.asarray(apply_quantized(model, variables, x, recipe=recipe, quant_params=state))
    np.testing.assert_allclose(logits, _reference(variables, x, scales, 6), rtol=1e-5, atol=1e-5)
    penalties = quantizer_penalties(state, recipe)
    np.testing.assert_allclose(float(penalties["doubled_scale"]), sum(scales), rtol=1e-6)

    qmodel = to_quantized_model(variables["params"], recipe, state)
    np.testing.assert_array_equal(qmodel.act_scales["Dense_1"]["scale"], scales[1])
    kernel = qmodel.params["Dense_0"]["kernel"]
    assert np.log2(float(kernel.scale.reshape(()))).is_integer()
    np.testing.assert_allclose(fake_quant_apply(model, qmodel, x), logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(integer_apply(model, qmodel, x), logits, rtol=1e-5, atol=1e-5)
    params, quant_params = to_qat_state(qmodel)
    assert quant_params["weights"] == {}
    np.testing.assert_array_equal(quant_params["activations"]["Dense_0"]["scale"], scales[0])
