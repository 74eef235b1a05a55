"""What a run of a language model adds: generated training text and generation speed.

Generated batches (`config.generated`): at step t the run draws
u_t ~ U[0, 1) from numpy's generator seeded with (seed, t, GENERATED_STREAM);
when u_t < fraction, every window of the batch keeps its first `prompt_len`
tokens and the rest of it is replaced by a continuation sampled (temperature,
top-k) with the KV cache (`kdq.generate.generate`, one jitted call before the
train step, keyed by fold_in(PRNGKey(seed), t)):

- source "student": on-policy distillation (GKD, Agarwal et al. 2024). The
  student samples with its current weights (fake-quantized as it trains), the
  teacher scores the sampled text inside the train step, and the objective's
  divergence terms pull the student's next-token distributions towards the
  teacher's on the student's own text. Use an objective without "ce": the
  sampled tokens are not ground truth.
- source "teacher": sequence-level KD (Kim & Rush 2016): the student learns
  the teacher's samples as targets (cross-entropy, optionally with logit KD).

The decision and the key depend only on (seed, t), so a resumed run generates
the same batches. A window whose prompt runs into padding (the short last
window of a document) keeps its real text.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdq.generate import generate
from kdq.quant import apply_quantized
from kdq.tasks import LanguageModeling
from kdq.train.setup import Setup
from kdq.train.state import TrainState

# Seeds the per-step draw of whether a batch is generated.
GENERATED_STREAM = 0x47454E


def is_language_model(setup: Setup) -> bool:
    """Whether the run's task is next-token prediction."""
    return isinstance(setup.task, LanguageModeling)


def check_sequence_models(config: ml_collections.ConfigDict, setup: Setup) -> None:
    """ValueError unless teacher and student share one vocabulary and generation fits the task.

    (That both read config.seq_len tokens, `build` checks.)

    Raises:
      ValueError: the teacher's vocabulary (its output size) differs from the
        student's; `config.generated` is on for a task that is not language
        modelling, or samples from a teacher the objective does not load.
    """
    if not is_language_model(setup):
        if config.generated.source != "none":
            raise ValueError(
                f"config.generated.source={config.generated.source!r} generates text, but "
                f"config.task={config.task!r}; set it to 'none'"
            )
        return
    if setup.teacher is not None and setup.teacher.num_classes != setup.student.num_classes:
        raise ValueError(
            f"the teacher's vocabulary ({setup.teacher.num_classes} tokens) differs from the "
            f"student's ({setup.student.num_classes}); distillation compares next-token "
            "distributions over one vocabulary"
        )
    if config.generated.source == "teacher" and setup.teacher is None:
        raise ValueError(
            "config.generated.source='teacher' samples the teacher's text, but the objective "
            "has no distillation term, so no teacher is loaded; set config.teacher and a KD "
            "term, or use source 'none'"
        )


def _student_apply(setup: Setup, quant_params: Any):
    """The student's forward pass as a generation `apply_fn`, fake-quantized by its recipe."""
    recipe = setup.recipe.with_nearest_rounding()

    def apply_fn(variables, tokens, cache):
        return apply_quantized(
            setup.student, variables, tokens, recipe=recipe, quant_params=quant_params, cache=cache
        )

    return apply_fn


@dataclasses.dataclass(frozen=True)
class GeneratedBatches:
    """Replaces a `fraction` of training batches by generated text (module docstring)."""

    setup: Setup
    source: str
    fraction: float
    prompt_len: int
    temperature: float
    top_k: int | None
    seed: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, setup: Setup) -> GeneratedBatches:
        section = config.generated
        return cls(
            setup,
            section.source,
            section.fraction,
            section.prompt_len,
            section.temperature,
            section.top_k or None,
            config.seed,
        )

    def is_generated(self, step: int) -> bool:
        """Whether step `step`'s batch is generated (a function of (seed, step) only)."""
        rng = np.random.default_rng([self.seed, step, GENERATED_STREAM])
        return bool(rng.random() < self.fraction)

    @functools.cached_property
    def _sample(self):
        setup = self.setup
        model = setup.student if self.source == "student" else setup.teacher

        @jax.jit
        def sample(variables, quant_params, tokens, key):
            apply_fn = _student_apply(setup, quant_params) if self.source == "student" else None
            return generate(
                model,
                variables,
                tokens[:, : self.prompt_len],
                num_tokens=tokens.shape[1] - self.prompt_len,
                key=key,
                temperature=self.temperature,
                top_k=self.top_k,
                apply_fn=apply_fn,
            )

        return sample

    def __call__(self, step: int, state: TrainState, teacher_variables: Any, batch: dict):
        """The batch of step `step`: `batch` itself, or its windows continued by the generator."""
        if not self.is_generated(step):
            return batch
        if self.source == "student":
            variables, quant_params = state.variables, state.quant_params
        else:
            variables, quant_params = teacher_variables, None
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        sampled = np.asarray(self._sample(variables, quant_params, batch["tokens"], key))
        real_prompt = np.asarray(batch["token_mask"])[:, self.prompt_len - 1]
        tokens = np.where(real_prompt[:, None], sampled, batch["tokens"])
        token_mask = np.where(real_prompt[:, None], True, batch["token_mask"])
        return {**batch, "tokens": tokens.astype(np.int32), "token_mask": token_mask}


def generation_speed(
    setup: Setup, state: TrainState, *, prompt_len: int = 16, num_tokens: int = 128
) -> dict[str, float]:
    """Tokens per second of greedy cached generation by the final student, batch 1.

    The student runs as it was evaluated (fake-quantized by its recipe). The
    first call compiles; the second, timed, generates `num_tokens` tokens
    after a `prompt_len`-token prompt (both shortened to fit `max_len`).

    Returns:
      {"generate_tokens_per_second": ..., "generate_tokens": num_tokens}.
    """
    max_len = getattr(setup.student, "max_len", prompt_len + num_tokens)
    num_tokens = min(num_tokens, max_len - prompt_len)
    apply_fn = _student_apply(setup, state.quant_params)
    sample = jax.jit(
        lambda variables, prompt: generate(
            setup.student,
            variables,
            prompt,
            num_tokens=num_tokens,
            key=jax.random.PRNGKey(0),
            greedy=True,
            apply_fn=apply_fn,
        )
    )
    prompt = jnp.full((1, prompt_len), ord("\n"), jnp.int32)
    jax.block_until_ready(sample(state.variables, prompt))
    start = time.perf_counter()
    jax.block_until_ready(sample(state.variables, prompt))
    seconds = time.perf_counter() - start
    return {"generate_tokens_per_second": num_tokens / seconds, "generate_tokens": num_tokens}
