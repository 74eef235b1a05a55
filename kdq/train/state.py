"""`TrainState`: everything a run updates, and nothing it does not.

The teacher is not in the state: it is never differentiated, never updated and
never re-saved; it is passed to the train step as a separate argument.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import struct

# The trainable subtrees, named once: the student's params, the learned
# quantizer state and the loss terms' parameters. The optimizer
# (`kdq.train.optim`) gives each its learning rate and weight decay, and
# pruning rules match paths under "params/".
TRAINABLE = ("params", "quant", "distill")


@struct.dataclass
class TrainState:
    """Student parameters, learned quantizer and loss parameters, optimizer state.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: the student's Linen params.
      quant_params: learned quantizer state (LSQ steps, PACT clip values); {}
        when the quantizers are calibrated rather than learned.
      distill_params: learned parameters of the loss terms (FitNets
        projections), {} when none.
      opt_state: optax state of `trainable`.
      key: the run's PRNG key (raw uint32[2]); step t uses fold_in(key, t).
      model_state: the student's other variable collections (e.g.
        {"batch_stats": ...}), updated by its forward pass in training, not by
        the optimizer; {} for models without.
    """

    step: jax.Array
    params: Any
    quant_params: Any
    distill_params: Any
    opt_state: optax.OptState
    key: jax.Array
    model_state: Any = struct.field(default_factory=dict)

    @property
    def variables(self) -> dict[str, Any]:
        """The student's Linen variables: params and model_state collections."""
        return {"params": self.params, **self.model_state}

    @property
    def trainable(self) -> dict[str, Any]:
        """The pytree the optimizer updates, keyed by `TRAINABLE`."""
        return dict(
            zip(TRAINABLE, (self.params, self.quant_params, self.distill_params), strict=True)
        )

    @classmethod
    def create(
        cls,
        *,
        params: Any,
        tx: optax.GradientTransformation,
        key: jax.Array,
        quant_params: Any = None,
        distill_params: Any = None,
        model_state: Any = None,
    ) -> TrainState:
        """A step-0 state with freshly initialised optimizer state."""
        state = cls(
            step=jax.numpy.zeros((), jax.numpy.int32),
            params=params,
            quant_params=quant_params or {},
            distill_params=distill_params or {},
            opt_state=None,
            key=key,
            model_state=dict(model_state or {}),
        )
        return state.replace(opt_state=tx.init(state.trainable))

    def apply_gradients(self, grads: dict[str, Any], tx: optax.GradientTransformation):
        """One optimizer step on `trainable`.

        `grads` is also passed to `tx.update` as the extra argument `grads`, for
        transforms that need the raw gradient after others changed the updates
        (Taylor-importance pruning).
        """
        tx = optax.with_extra_args_support(tx)
        updates, opt_state = tx.update(grads, self.opt_state, self.trainable, grads=grads)
        new = optax.apply_updates(self.trainable, updates)
        params, quant_params, distill_params = (new[name] for name in TRAINABLE)
        return self.replace(
            step=self.step + 1,
            params=params,
            quant_params=quant_params,
            distill_params=distill_params,
            opt_state=opt_state,
        )
