"""The interface of activation and weight quantizers, and their registry.

A quantizer mode (`QuantRecipe.act_mode` / `weight_mode`) is one object: an
`ActQuantizer` or a `WeightQuantizer` registered under its name with
`register`. It says how a selected array is fake-quantized in training
(`apply`, with its straight-through gradient), where its state starts
(`init`), how that state becomes the scale (and zero point) of the exported
integer model (`export`) and back (`from_export`), which specs it accepts
(`check_spec`) and which penalties it adds to the training loss (`penalties`).

Per-module / per-weight state is a dict of arrays, e.g. {"scale": s} or
{"log_step": log s}; it lives in `quant_params` next to the params and is
trained by the same optimizer when the quantizer is `learned`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdq.quant.qarray import QArray
from kdq.quant.spec import QuantSpec
from kdq.quant.ste import _check_positive_if_concrete, straight_through

if TYPE_CHECKING:
    from kdq.quant.recipe import QuantRecipe

State = dict[str, jax.Array]
# |log s| bound of learned steps / clip values (see `learned_value`).
LOG_BOUND = 44.0


class Calibration(Protocol):
    """What calibration batches measured at each selected module input."""

    def range(self, path: str) -> State:
        """{"scale": s[, "zero_point": z]} of the module's input (see `calibrate_activations`)."""

    def mean_abs(self, path: str) -> float:
        """<|x|>: the mean over batches of the mean |x| of the module's input."""


class ActQuantizer(abc.ABC):
    """One activation mode: how the input x of a selected module is quantized.

    Attributes:
      name: the `act_mode` it is registered under.
      learned: its state receives gradient (trained with the params).
      needs_calibration: it keeps per-module state, initialised from
        calibration batches (`init`); False: it needs no state at all.
    """

    name: str
    learned: bool = False
    needs_calibration: bool = True

    def check_spec(self, rules_name: str, pattern: str, spec: QuantSpec) -> None:
        """Raises a ValueError naming `rules_name` and `pattern` if this mode cannot use `spec`."""
        if self.learned:
            require_nearest(rules_name, pattern, spec, self.name)

    def init(self, spec: QuantSpec, calibration: Calibration, path: str, *, lsq_init: str):
        """The initial state of module `path`'s input quantizer."""
        raise self._stateless("init")

    @abc.abstractmethod
    def apply(
        self,
        x: jax.Array,
        spec: QuantSpec,
        state: State | None,
        *,
        key: jax.Array | None,
        path: str,
    ) -> jax.Array:
        """x fake-quantized (forward and straight-through gradient); `key`: stochastic rounding."""

    def export(self, state: State, spec: QuantSpec, path: str) -> State:
        """{"scale": s[, "zero_point": z]} that the integer model quantizes the input with."""
        raise self._stateless("export")

    def from_export(self, exported: State, spec: QuantSpec) -> State:
        """The state whose `export` is `exported` (continuing QAT from an exported model)."""
        raise self._stateless("from_export")

    def _stateless(self, method: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} defines no {method}: an activation quantizer with state "
            "(needs_calibration=True) defines init, export and from_export"
        )

    def input_range(self, x: jax.Array, spec: QuantSpec, exported: State | None):
        """(scale, zero point or None) the exported model quantizes input `x` with."""
        return exported["scale"], exported.get("zero_point")

    def penalties(self, act_state: Any, recipe: QuantRecipe) -> dict[str, jax.Array]:
        """Terms added to the training loss, by name (default: none)."""
        del act_state, recipe
        return {}


class LearnedActQuantizer(ActQuantizer):
    """An activation quantizer with one learned symmetric scale per module input.

    Its specs must be per tensor, symmetric and round to nearest; its state
    is {state_key: log of the learned value}.
    """

    learned = True
    state_key: str = ""

    def check_spec(self, rules_name: str, pattern: str, spec: QuantSpec) -> None:
        require_per_tensor(rules_name, pattern, spec, self.name)
        hint = " (signed=False for non-negative inputs)"
        require_symmetric(rules_name, pattern, spec, self.name, hint)
        require_nearest(rules_name, pattern, spec, self.name)


class WeightQuantizer(abc.ABC):
    """One weight mode: how a selected param w is quantized.

    Attributes:
      name: the `weight_mode` it is registered under.
      learned: it keeps state per weight (`init` / `from_export` return it)
        that receives gradient; False: `init` / `from_export` return None.
    """

    name: str
    learned: bool = False

    def check_spec(self, rules_name: str, pattern: str, spec: QuantSpec) -> None:
        """Raises a ValueError naming `rules_name` and `pattern` if this mode cannot use `spec`."""
        if self.learned:
            require_nearest(rules_name, pattern, spec, self.name)

    @abc.abstractmethod
    def init(self, w: jax.Array, spec: QuantSpec, *, lsq_init: str) -> State | None:
        """The initial state of weight w's quantizer (None without state)."""

    @abc.abstractmethod
    def apply(
        self, w: jax.Array, spec: QuantSpec, state: State, *, key: jax.Array | None, path: str
    ) -> jax.Array:
        """w fake-quantized (forward and straight-through gradient); `key`: stochastic rounding."""

    @abc.abstractmethod
    def export(self, w: jax.Array, spec: QuantSpec, state: State, path: str) -> QArray:
        """The integer weight of the exported model."""

    @abc.abstractmethod
    def from_export(self, q: QArray) -> State | None:
        """The state whose `export` gives back `q` (None without state)."""

    def penalties(self, weight_state: Any, recipe: QuantRecipe) -> dict[str, jax.Array]:
        """Terms added to the training loss, by name (default: none)."""
        del weight_state, recipe
        return {}


ACT_QUANTIZERS: dict[str, ActQuantizer] = {}
WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {}


def register(quantizer: ActQuantizer | WeightQuantizer):
    """Adds `quantizer` to the activation or weight registry under `quantizer.name`.

    Returns:
      `quantizer`.

    Raises:
      ValueError: the name is taken, or `quantizer` is neither kind.
    """
    if isinstance(quantizer, ActQuantizer):
        registry, kind = ACT_QUANTIZERS, "act_mode"
    elif isinstance(quantizer, WeightQuantizer):
        registry, kind = WEIGHT_QUANTIZERS, "weight_mode"
    else:
        raise ValueError(
            f"quantizer must be an ActQuantizer or a WeightQuantizer, got {type(quantizer)!r}"
        )
    if not isinstance(getattr(quantizer, "name", None), str):
        raise ValueError(f"a quantizer needs a str name, got {type(quantizer).__name__}")
    if quantizer.name in registry:
        raise ValueError(f"{kind} {quantizer.name!r} is already registered")
    registry[quantizer.name] = quantizer
    return quantizer


def act_quantizer(act_mode: str) -> ActQuantizer:
    """The registered activation quantizer `act_mode`; ValueError listing the modes if none."""
    if act_mode not in ACT_QUANTIZERS:
        raise ValueError(f"act_mode must be one of {tuple(ACT_QUANTIZERS)}, got {act_mode=}")
    return ACT_QUANTIZERS[act_mode]


def weight_quantizer(weight_mode: str) -> WeightQuantizer:
    """The registered weight quantizer `weight_mode`; ValueError listing the modes if none."""
    if weight_mode not in WEIGHT_QUANTIZERS:
        raise ValueError(
            f"weight_mode must be one of {tuple(WEIGHT_QUANTIZERS)}, got {weight_mode=}"
        )
    return WEIGHT_QUANTIZERS[weight_mode]


def require_per_tensor(rules_name: str, pattern: str, spec: QuantSpec, mode: str) -> None:
    """ValueError unless `spec` has one scale per tensor (no axes, no groups)."""
    if spec.axes or spec.group_size:
        raise ValueError(
            f"{rules_name} {pattern!r}: {mode} activation ranges are per tensor; "
            f"got axes={spec.axes}, group_size={spec.group_size}"
        )


def require_symmetric(
    rules_name: str, pattern: str, spec: QuantSpec, mode: str, hint: str = ""
) -> None:
    """ValueError unless `spec` is symmetric (a learned step or clip has no zero point)."""
    if not spec.symmetric:
        raise ValueError(
            f"{rules_name} {pattern!r}: {mode} learns a symmetric quantizer; "
            f"use symmetric=True{hint}"
        )


def require_nearest(rules_name: str, pattern: str, spec: QuantSpec, mode: str) -> None:
    """ValueError for stochastic rounding (learned quantizers' gradients assume round to nearest)."""
    if spec.rounding == "stochastic":
        fixed = sorted(
            name
            for registry in (ACT_QUANTIZERS, WEIGHT_QUANTIZERS)
            for name, quantizer in registry.items()
            if not quantizer.learned
        )
        raise ValueError(
            f"{rules_name} {pattern!r}: rounding='stochastic' is not supported with "
            f"{mode} quantizers (their gradients are defined for round to nearest); use "
            f"rounding='nearest', or a {' / '.join(fixed)} mode"
        )


def learned_value(state: Mapping[str, jax.Array], key: str, path: str = "") -> jax.Array:
    """v = exp(clip(state[key], -LOG_BOUND, LOG_BOUND)) > 0, with dv/du = v.

    Learned steps and clip values are stored as u = log v, so no optimizer
    update can make them zero or negative, and an update du changes v by the
    factor exp(du) at every scale (as the log-domain thresholds of Jain et
    al. 2019). The clip (v in [e^-44, e^44] ~ [8e-20, 1e19], finite for every
    finite u) is passed straight through, so the gradient with respect to u
    is the gradient with respect to v times v.

    Args:
      state: the state of one quantizer.
      key: the entry holding log v, e.g. "log_step".
      path: the quantizer's path, named in the error when the key is missing.

    Returns:
      The positive, finite value v (the shape of u).
    """
    try:
        u = state[key]
    except (KeyError, TypeError):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"learned quantizer state{f' of {path!r}' if path else ''} needs the key {key!r} "
            f"(got {got}); build it with kdq.quant.init_quant_params or learned_state"
        ) from None
    u = jnp.asarray(u, jnp.float32)
    return jnp.exp(straight_through(u, jnp.clip(u, -LOG_BOUND, LOG_BOUND)))


def positive_scale(scale: ArrayLike) -> jax.Array:
    """`scale` as float32, checked positive and finite (ValueError when concrete, NaN when traced)."""
    return _check_positive_if_concrete(jnp.asarray(scale, jnp.float32), "scale")


def _learned(mode: str) -> ActQuantizer:
    learned = tuple(name for name, quantizer in ACT_QUANTIZERS.items() if quantizer.learned)
    if mode not in learned:
        raise ValueError(f"mode must be one of {learned}, got mode={mode!r}")
    return ACT_QUANTIZERS[mode]


def _mode_of(state: State) -> str:
    """The learned activation mode whose state key `state` holds."""
    for name, quantizer in ACT_QUANTIZERS.items():
        if getattr(quantizer, "state_key", "") in state:
            return name
    keys = {n: q.state_key for n, q in ACT_QUANTIZERS.items() if getattr(q, "state_key", "")}
    raise ValueError(f"state {sorted(state)} is no learned quantizer's state; their keys: {keys}")


def learned_state(scale: ArrayLike, spec: QuantSpec, mode: str) -> State:
    """The state of learned activation mode `mode` whose quantizer scale is `scale`.

    lsq: {"log_step": log s}; pact: {"log_alpha": log(s * qmax)} (the inverse
    of `learned_scale`, which gives back `scale` up to float32 rounding of
    exp(log(.)), a relative 1e-6).

    Args:
      scale: the quantizer scale (positive).
      spec: the quantizer (its qmax for PACT).
      mode: "lsq" or "pact".

    Returns:
      The trainable state, float32 logarithms.
    """
    return _learned(mode).from_export({"scale": scale}, spec)


def learned_scale(
    state: State, spec: QuantSpec, path: str = "", *, mode: str | None = None
) -> jax.Array:
    """The scale a learned activation quantizer quantizes with: s = step, or s = alpha / qmax.

    Args:
      state: the mode's trainable state ({"log_step": u} or {"log_alpha": u}).
      spec: the quantizer (its qmax for PACT).
      path: the module path, for error messages.
      mode: "lsq" or "pact"; None infers it from the state's key.

    Returns:
      The positive float32 scale.
    """
    return _learned(mode or _mode_of(state)).export(state, spec, path)["scale"]
