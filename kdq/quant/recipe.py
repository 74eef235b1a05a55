"""`QuantRecipe`: which weights and activations are quantized, and how.

A recipe is frozen and hashable (static under `jit`) and round-trips through
JSON, so it is stored with every quantized checkpoint.

* `weight_rules` match param paths ('Dense_0/kernel'); `act_rules` match
  module paths ('Dense_0'): the activation quantized is the *input* of the
  selected Dense / DenseGeneral / Conv / Einsum module.
* `weight_mode`: "calibrated" (scale from `QuantSpec.calibration` at every
  call) or "lsq" (a learned step per scale group, Esser et al. 2020).
* `act_mode`: "dynamic" (range of the current batch), "static" (ranges from
  calibration, fixed), "lsq" (learned step) or "pact" (learned clipping value,
  Choi et al. 2018).
* `pact_alpha_decay`: lambda of PACT's L2 penalty lambda * sum alpha^2 on the
  clipping values, added to the training loss (Choi et al. 2018, section 2:
  without it alpha only receives gradient from clipped inputs and never shrinks).
* Stochastic rounding (`QuantSpec(rounding="stochastic")`) is a training-time
  regulariser for calibrated weights and dynamic / static activations: the
  train step draws fresh noise each step, evaluation and exported models round
  to nearest (`with_nearest_rounding`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from kdq.quant import quantizers
from kdq.quant.spec import QuantSpec
from kdq.rules import compile_rules

DEFAULT_PACT_ALPHA_DECAY = 2e-4
# The modes of kdq.quant.quantizers (a mode registered later is accepted too).
WEIGHT_MODES = tuple(quantizers.WEIGHT_QUANTIZERS)
ACT_MODES = tuple(quantizers.ACT_QUANTIZERS)
# The modes that learn nothing: a post-training recipe uses these.
PTQ_WEIGHT_MODES = tuple(m for m, q in quantizers.WEIGHT_QUANTIZERS.items() if not q.learned)
PTQ_ACT_MODES = tuple(m for m, q in quantizers.ACT_QUANTIZERS.items() if not q.learned)

Rules = tuple[tuple[str, QuantSpec | None], ...]


def _freeze_rules(rules: Any, name: str) -> Rules:
    compile_rules(rules, QuantSpec, name=name)
    return tuple((str(pattern), spec) for pattern, spec in rules)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRecipe:
    """How a model is quantized; see the module docstring.

    Attributes:
      weight_rules: (regex, QuantSpec | None) over param paths.
      act_rules: (regex, QuantSpec | None) over module paths.
      weight_mode: a mode of `WEIGHT_MODES` ("calibrated" or "lsq").
      act_mode: a mode of `ACT_MODES` ("dynamic", "static", "lsq" or "pact").
      pact_alpha_decay: lambda >= 0 of the PACT penalty lambda * sum alpha^2
        (used when act_mode is "pact"); default 2e-4.
    """

    weight_rules: Rules = ()
    act_rules: Rules = ()
    weight_mode: str = "calibrated"
    act_mode: str = "dynamic"
    pact_alpha_decay: float = DEFAULT_PACT_ALPHA_DECAY

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_rules", _freeze_rules(self.weight_rules, "weight_rules"))
        object.__setattr__(self, "act_rules", _freeze_rules(self.act_rules, "act_rules"))
        for quantizer, name, rules in (
            (self.weight_quantizer, "weight_rules", self.weight_rules),
            (self.act_quantizer, "act_rules", self.act_rules),
        ):
            for pattern, spec in rules:
                if spec is not None:
                    quantizer.check_spec(name, pattern, spec)
        decay = self.pact_alpha_decay
        if (
            isinstance(decay, bool)
            or not isinstance(decay, int | float)
            or not math.isfinite(decay)
            or decay < 0
        ):
            raise ValueError(
                f"pact_alpha_decay must be a finite number >= 0, got pact_alpha_decay={decay!r}"
            )
        object.__setattr__(self, "pact_alpha_decay", float(decay))

    @property
    def weight_quantizer(self) -> quantizers.WeightQuantizer:
        """The registered quantizer of `weight_mode` (see `kdq.quant.quantizers`)."""
        return quantizers.weight_quantizer(self.weight_mode)

    @property
    def act_quantizer(self) -> quantizers.ActQuantizer:
        """The registered quantizer of `act_mode` (see `kdq.quant.quantizers`)."""
        return quantizers.act_quantizer(self.act_mode)

    @property
    def stochastic(self) -> bool:
        """Whether any weight or activation rule rounds stochastically."""
        return any(
            spec is not None and spec.rounding == "stochastic"
            for _, spec in (*self.weight_rules, *self.act_rules)
        )

    def with_nearest_rounding(self) -> QuantRecipe:
        """The same recipe with every stochastic rule rounding to nearest (evaluation, export)."""

        def nearest(rules):
            return tuple(
                (p, s if s is None else dataclasses.replace(s, rounding="nearest"))
                for p, s in rules
            )

        return dataclasses.replace(
            self, weight_rules=nearest(self.weight_rules), act_rules=nearest(self.act_rules)
        )

    @property
    def quantizes_weights(self) -> bool:
        return any(spec is not None for _, spec in self.weight_rules)

    @property
    def quantizes_activations(self) -> bool:
        return any(spec is not None for _, spec in self.act_rules)

    def to_json(self) -> str:
        """JSON text of the recipe (specs as dicts)."""

        def rules(rs):
            return [[p, None if s is None else dataclasses.asdict(s)] for p, s in rs]

        return json.dumps(
            {
                "weight_rules": rules(self.weight_rules),
                "act_rules": rules(self.act_rules),
                "weight_mode": self.weight_mode,
                "act_mode": self.act_mode,
                "pact_alpha_decay": self.pact_alpha_decay,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> QuantRecipe:
        """Inverse of `to_json` (text without "pact_alpha_decay" gets the default)."""
        data = json.loads(text)

        def rules(rs):
            return tuple(
                (p, None if s is None else QuantSpec(**{**s, "axes": tuple(s["axes"])}))
                for p, s in rs
            )

        return cls(
            weight_rules=rules(data["weight_rules"]),
            act_rules=rules(data["act_rules"]),
            weight_mode=data["weight_mode"],
            act_mode=data["act_mode"],
            pact_alpha_decay=data.get("pact_alpha_decay", DEFAULT_PACT_ALPHA_DECAY),
        )


FLOAT = QuantRecipe()  # quantizes nothing: the float model


def is_integer_model(recipe: QuantRecipe) -> bool:
    """Whether `recipe` yields a model that runs in integers end to end.

    That needs quantized weights and quantized activations (static, learned
    or dynamic ranges: `kdq.quant.integer_apply` runs each of them on integer
    operands).

    Args:
      recipe: the quantization recipe.

    Returns:
      True when some weight rule and some activation rule have a spec.
    """
    return recipe.quantizes_weights and recipe.quantizes_activations
