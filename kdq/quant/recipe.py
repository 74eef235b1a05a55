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
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kdq.quant.spec import QuantSpec
from kdq.rules import compile_rules

WEIGHT_MODES = ("calibrated", "lsq")
ACT_MODES = ("dynamic", "static", "lsq", "pact")

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
      weight_mode: "calibrated" or "lsq".
      act_mode: "dynamic", "static", "lsq" or "pact".
    """

    weight_rules: Rules = ()
    act_rules: Rules = ()
    weight_mode: str = "calibrated"
    act_mode: str = "dynamic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_rules", _freeze_rules(self.weight_rules, "weight_rules"))
        object.__setattr__(self, "act_rules", _freeze_rules(self.act_rules, "act_rules"))
        if self.weight_mode not in WEIGHT_MODES:
            raise ValueError(
                f"weight_mode must be one of {WEIGHT_MODES}, got weight_mode={self.weight_mode!r}"
            )
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got act_mode={self.act_mode!r}")
        if self.act_mode != "dynamic":
            for pattern, spec in self.act_rules:
                if spec is not None and (spec.axes or spec.group_size):
                    raise ValueError(
                        f"act_rules {pattern!r}: {self.act_mode} activation ranges are per "
                        f"tensor; got axes={spec.axes}, group_size={spec.group_size}"
                    )
                if spec is not None and self.act_mode in ("lsq", "pact") and not spec.symmetric:
                    raise ValueError(
                        f"act_rules {pattern!r}: {self.act_mode} learns a symmetric quantizer; "
                        "use symmetric=True (signed=False for non-negative inputs)"
                    )
        if self.weight_mode == "lsq":
            for pattern, spec in self.weight_rules:
                if spec is not None and not spec.symmetric:
                    raise ValueError(
                        f"weight_rules {pattern!r}: lsq learns a symmetric quantizer; "
                        "use symmetric=True"
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
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> QuantRecipe:
        """Inverse of `to_json`."""
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
        )
