"""Sparsity schedules: the sparsity to prune to at each optimizer step.

A schedule has a begin step t0, an end step t1 and a frequency dt with
t1 - t0 = n * dt. The masks are recomputed only at the *update steps*

    U = {t0 + k * dt : k = 0, 1, ..., n}

and between two update steps the masks of the earlier one are kept. The value
of the schedule at step t is the sparsity of the last update step u <= t,

    u(t) = t0 + floor((t - t0) / dt) * dt   for t0 <= t <= t1,

with the gradual polynomial decay of Zhu & Gupta (2017), "To prune, or not to
prune", from the initial sparsity s_i to the final s_f:

    s(t) = s_i                                                  for t < t0
    s(t) = s_f + (s_i - s_f) * (1 - (u(t) - t0) / (t1 - t0))^p  for t0 <= t <= t1
    s(t) = s_f                                                  for t > t1

with power p (3 by default). When t0 == t1 (a single update step) the middle
case is s_f. Everything evaluated on a step is jittable with a traced step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kdq.prune.masks import _is_concrete_number, _is_int, check_sparsity


def _check_step(value: object, name: str) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsitySchedule:
    """A sparsity schedule; see the module docstring for the exact semantics.

    Attributes:
      initial: s_i in [0, 1), the value before `begin`.
      final: s_f in [initial, 1), the value after `end`.
      begin: t0 >= 0, the first update step.
      end: t1 >= t0, the last update step; t1 - t0 must be a multiple of
        `frequency`.
      frequency: dt >= 1, steps between two mask updates.
      power: p > 0, the exponent of the polynomial decay.
    """

    initial: float = 0.0
    final: float
    begin: int = 0
    end: int
    frequency: int = 1
    power: float = 3.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", check_sparsity(self.initial, "initial"))
        object.__setattr__(self, "final", check_sparsity(self.final, "final"))
        if self.final < self.initial:
            raise ValueError(
                f"final must be >= initial, got initial={self.initial!r}, final={self.final!r}"
            )
        object.__setattr__(self, "begin", _check_step(self.begin, "begin"))
        object.__setattr__(self, "end", _check_step(self.end, "end"))
        if self.end < self.begin:
            raise ValueError(f"end must be >= begin, got begin={self.begin}, end={self.end}")
        if not _is_int(self.frequency) or self.frequency < 1:
            raise ValueError(f"frequency must be an int >= 1, got frequency={self.frequency!r}")
        object.__setattr__(self, "frequency", int(self.frequency))
        if (self.end - self.begin) % self.frequency:
            raise ValueError(
                f"end - begin must be a multiple of frequency, got begin={self.begin}, "
                f"end={self.end}, frequency={self.frequency}"
            )
        if not _is_concrete_number(self.power) or not float(self.power) > 0:
            raise ValueError(f"power must be a number > 0, got power={self.power!r}")
        object.__setattr__(self, "power", float(self.power))

    def __call__(self, step: int | jax.Array) -> jax.Array:
        """s(step), a float32 scalar; `step` may be traced."""
        step = jnp.asarray(step, jnp.int32)
        if self.end == self.begin:
            return jnp.where(step < self.begin, self.initial, self.final).astype(jnp.float32)
        last = self.begin + (step - self.begin) // self.frequency * self.frequency
        last = jnp.clip(last, self.begin, self.end)
        progress = (last - self.begin).astype(jnp.float32) / (self.end - self.begin)
        decayed = self.final + (self.initial - self.final) * (1.0 - progress) ** self.power
        return jnp.where(step < self.begin, self.initial, decayed).astype(jnp.float32)

    def is_update_step(self, step: int | jax.Array) -> jax.Array:
        """Whether the masks are recomputed at `step` (a bool scalar; `step` may be traced)."""
        step = jnp.asarray(step, jnp.int32)
        return (
            (step >= self.begin) & (step <= self.end) & ((step - self.begin) % self.frequency == 0)
        )

    def should_update(self, step: int) -> bool:
        """`is_update_step` for a python int step, on the host."""
        step = _check_step(step, "step")
        return self.begin <= step <= self.end and (step - self.begin) % self.frequency == 0


def one_shot_schedule(sparsity: float, *, begin: int = 0) -> SparsitySchedule:
    """Dense before `begin`, pruned once to `sparsity` at step `begin`.

    Args:
      sparsity: the sparsity from `begin` on, in [0, 1).
      begin: the single update step.

    Returns:
      The schedule s(t) = 0 for t < begin, `sparsity` for t >= begin.
    """
    return SparsitySchedule(
        initial=0.0, final=check_sparsity(sparsity), begin=begin, end=begin, frequency=1
    )


def constant_schedule(
    sparsity: float, *, begin: int = 0, end: int | None = None, frequency: int = 1
) -> SparsitySchedule:
    """The same `sparsity` at every step, the masks reselected every `frequency` steps.

    Args:
      sparsity: the sparsity, in [0, 1).
      begin: the first update step.
      end: the last update step (`begin` when None: a single update).
      frequency: steps between two updates; end - begin must be a multiple.

    Returns:
      The schedule s(t) = `sparsity` with update steps begin + k * frequency <= end.
    """
    sparsity = check_sparsity(sparsity)
    return SparsitySchedule(
        initial=sparsity,
        final=sparsity,
        begin=begin,
        end=begin if end is None else end,
        frequency=frequency,
    )


def polynomial_schedule(
    *, initial: float, final: float, begin: int, end: int, frequency: int = 1, power: float = 3.0
) -> SparsitySchedule:
    """The gradual polynomial decay of Zhu & Gupta (2017) from `initial` to `final`.

    s(t) = s_f + (s_i - s_f) * (1 - (u(t) - t0) / (t1 - t0))^p on [t0, t1], with
    u(t) the last update step <= t (see the module docstring).

    Args:
      initial: s_i in [0, 1).
      final: s_f in [initial, 1).
      begin: t0, the first update step.
      end: t1 > t0, the last update step; end - begin must be a multiple of
        `frequency`.
      frequency: dt >= 1.
      power: p > 0.

    Returns:
      The schedule.
    """
    if _is_int(begin) and _is_int(end) and end <= begin:
        raise ValueError(
            f"end must be > begin for a gradual schedule, got begin={begin}, end={end}"
        )
    return SparsitySchedule(
        initial=initial, final=final, begin=begin, end=end, frequency=frequency, power=power
    )


def polynomial_sparsity(
    step: int | jax.Array,
    *,
    initial: float,
    final: float,
    begin: int,
    end: int,
    frequency: int = 1,
    power: float = 3.0,
) -> jax.Array:
    """s(step) of `polynomial_schedule(...)`; `step` may be traced.

    Args:
      step: the optimizer step t.
      initial, final, begin, end, frequency, power: see `polynomial_schedule`.

    Returns:
      A float32 scalar.
    """
    return polynomial_schedule(
        initial=initial, final=final, begin=begin, end=end, frequency=frequency, power=power
    )(step)
