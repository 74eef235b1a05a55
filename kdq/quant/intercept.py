"""Activation quantization on any Linen model, without editing it.

`flax.linen.intercept_methods` sees every module call; for each call of a
Dense, DenseGeneral, Conv or Einsum module whose path ('/'-joined module
names, e.g. 'block_1/Conv_0') an activation rule selects, the module's input
is fake-quantized before the module runs:

    with nn.intercept_methods(activation_interceptor(recipe, act_state)):
        logits = model.apply(variables, x)

The input is quantized by the quantizer of `recipe.act_mode`
(`kdq.quant.quantizers`). `act_state` holds its per-module state, nested by
module path, e.g. {"Dense_0": {"scale": s[, "zero_point": z]}} (static),
{"log_step": log s} (lsq) or {"log_alpha": log alpha} (pact; see
`kdq.quant.quantizers.base.learned_value` for why learned values are stored
as logarithms); dynamic mode needs none.

Stochastic rounding: pass `key`; module `path`'s n-th call in one forward pass
uses fold_in(fold_in(key, path_key(path)), n), so every module and call draws
independent noise.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from kdq.quant.quantizers import ActQuantizer
from kdq.quant.recipe import QuantRecipe, Rules
from kdq.quant.spec import QuantSpec
from kdq.rules import PathRules

SUPPORTED_MODULES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
STATS_COLLECTION = "kdq_activation_stats"


def path_key(path: str) -> int:
    """A stable 31-bit integer for a '/'-joined path (CRC-32), for `jax.random.fold_in`."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def module_path(module: nn.Module) -> str:
    """'/'-joined names of a bound module, e.g. 'block_1/Conv_0' ('' for the root)."""
    return "/".join(module.path)


def module_rules(rules: Rules) -> PathRules:
    """Activation rules, (regex, QuantSpec | None) over module paths, as `PathRules`."""
    return PathRules(rules, QuantSpec, name="act_rules")


def lookup(tree: Any, path: str) -> Any:
    """tree[part0][part1]... for a '/'-joined path; KeyError if absent."""
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _is_module_call(context) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, SUPPORTED_MODULES)


def module_input_interceptor(rules: Rules, call: Callable[..., Any]):
    """An interceptor that hands each selected module call to `call`.

    Args:
      rules: (regex, QuantSpec | None) over module paths.
      call: `call(next_fun, args, kwargs, module, path, spec)`, invoked for each
        `__call__` of a Dense / DenseGeneral / Conv / Einsum module that a rule
        selects with a spec; every other call runs unchanged.

    Returns:
      A function for `flax.linen.intercept_methods`.
    """
    compiled = module_rules(rules)

    def interceptor(next_fun, args, kwargs, context):
        if not _is_module_call(context) or not args:
            return next_fun(*args, **kwargs)
        path = module_path(context.module)
        spec = compiled.value(path)
        if spec is None:
            return next_fun(*args, **kwargs)
        return call(next_fun, args, kwargs, context.module, path, spec)

    return interceptor


def activation_interceptor(
    recipe: QuantRecipe,
    act_state: Any = None,
    *,
    record: Callable[[jax.Array, QuantSpec], tuple[jax.Array, jax.Array]] | None = None,
    key: jax.Array | None = None,
):
    """An interceptor quantizing (or recording) the inputs of the selected modules.

    Args:
      recipe: gives `act_rules` and `act_mode`.
      act_state: per-module quantizer state (see module docstring); unused in
        dynamic mode.
      record: if given, inputs are not quantized; instead `record(x, spec)`
        returns a per-batch (lo, hi) range that is sown into the
        `STATS_COLLECTION` collection (apply with mutable=[STATS_COLLECTION]).
      key: PRNG key for rules with rounding="stochastic" (see module docstring).

    Returns:
      A function for `flax.linen.intercept_methods`.
    """
    calls: dict[str, int] = {}
    quantizer = recipe.act_quantizer

    def call(next_fun, args, kwargs, module, path, spec):
        x, rest = args[0], args[1:]
        if record is not None:
            lo, hi = record(x, spec)
            module.sow(STATS_COLLECTION, "lo", lo)
            module.sow(STATS_COLLECTION, "hi", hi)
            return next_fun(x, *rest, **kwargs)
        call_key = None
        if key is not None and spec.rounding == "stochastic":
            index = calls[path] = calls.get(path, -1) + 1
            call_key = jax.random.fold_in(jax.random.fold_in(key, path_key(path)), index)
        state = module_state(quantizer, act_state, path)
        x_hat = quantizer.apply(x, spec, state, key=call_key, path=path)
        return next_fun(x_hat, *rest, **kwargs)

    return module_input_interceptor(recipe.act_rules, call)


def module_state(quantizer: ActQuantizer, act_state: Any, path: str) -> Any:
    """Module `path`'s entry of `act_state` (None for a quantizer without state).

    Raises:
      ValueError: the quantizer keeps state and `act_state` has none for `path`.
    """
    if not quantizer.needs_calibration:
        return None
    try:
        return lookup(act_state, path)
    except (KeyError, TypeError):
        raise ValueError(
            f"no {quantizer.name} activation state for module {path!r}: calibrate the "
            "activations (kdq.quant.calibrate_activations / init_quant_params) before applying"
        ) from None


def activation_report(
    model: nn.Module, variables: Any, *args: Any, rules: Rules, **kwargs: Any
) -> dict[str, QuantSpec | None]:
    """Which quantizable modules the activation rules select, checking the rules.

    Traces `model.apply(variables, *args, **kwargs)` abstractly (no compute).

    Args:
      model, variables, *args, **kwargs: as for `model.apply`.
      rules: (regex, QuantSpec | None) over module paths.

    Returns:
      {module path: spec, or None where the input stays float} for every
      Dense / DenseGeneral / Conv / Einsum call.

    Raises:
      ValueError: the rules select no quantizable module, or a rule selects
        only modules kdq cannot quantize (e.g. a custom block: select the
        layers inside it).
    """
    compiled = module_rules(rules)
    supported: dict[str, QuantSpec | None] = {}
    hits: dict[int, list[str]] = {}
    unsupported: dict[int, list[str]] = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
        path = module_path(context.module)
        if context.method_name == "__call__" and path:
            index, spec = compiled.lookup(path)
            if isinstance(context.module, SUPPORTED_MODULES):
                supported[path] = spec
                if index is not None:
                    hits.setdefault(index, []).append(path)
            elif index is not None and spec is not None:
                unsupported.setdefault(index, []).append(
                    f"{path} ({type(context.module).__name__})"
                )
        return next_fun(*call_args, **call_kwargs)

    def run(variables, *args):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *args, **kwargs)

    jax.eval_shape(run, variables, *args)
    for index, (regex, spec) in enumerate(compiled):
        if spec is not None and index in unsupported and index not in hits:
            raise ValueError(
                f"act_rules[{index}] {regex.pattern!r} selects {unsupported[index]}, which kdq "
                "cannot quantize: only the inputs of Dense, DenseGeneral, Conv and Einsum "
                "modules are quantized; select the layers inside instead"
            )
    if compiled and not any(spec is not None for spec in supported.values()):
        raise ValueError(
            f"act_rules {compiled.patterns} select no Dense/DenseGeneral/Conv/"
            f"Einsum module (regexes must match a whole module path); their paths: "
            f"{sorted(supported)}"
        )
    return supported
