"""Features of byte-level text examples: next-byte windows and labelled passages.

The examples themselves, and how documents become them, are described in
``kdq.data.text``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdq.data.features import check_label

BYTE_VOCAB = 256
"""Number of distinct tokens: one per byte value."""
PASSAGE_LENGTH = 256
"""Default number of bytes in a passage."""


def check_positive_length(value: Any, name: str) -> int:
    """Returns ``value`` as an int.

    Args:
        value: A sequence length to check.
        name: The argument's name, for the error message.

    Returns:
        ``int(value)``.

    Raises:
        ValueError: If it is not a positive integer (a bool or float is not).
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_tokens(
    tokens: Any,
    shape: tuple[int, ...],
    num_classes: int | None,
    *,
    split: str,
    index: int,
) -> None:
    """Checks that an example's tokens form an integer array of ``shape`` in [0, num_classes).

    Args:
        tokens: The example's "tokens" value.
        shape: The shape the tokens must have.
        num_classes: Vocabulary size bounding the tokens; None checks only that
            they are non-negative.
        split: Name of the split or source, for the error message.
        index: Index of the example in that split, for the error message.

    Raises:
        ValueError: Naming the split, the example's index and what is wrong.
    """
    values = np.asarray(tokens)
    if values.shape != shape or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"{split} example {index} has tokens of shape {values.shape} and dtype "
            f"{values.dtype}; expected integer tokens of shape {shape}"
        )
    if values.size and (
        values.min() < 0 or (num_classes is not None and values.max() >= num_classes)
    ):
        bound = "num_classes" if num_classes is None else num_classes
        raise ValueError(
            f"{split} example {index} has tokens in [{values.min()}, {values.max()}], outside "
            f"[0, {bound}); fix the source, or pass the vocabulary size as num_classes"
        )


@dataclasses.dataclass(frozen=True)
class TokenFeatures:
    """One window of next-byte prediction per example (``kdq.data.text``).

    A raw and a model-ready example are both ``{"tokens": int32 (seq_len + 1,),
    "token_mask": bool (seq_len,)}``: the model reads ``tokens[:-1]`` and predicts
    ``tokens[1:]``, and ``token_mask[t]`` says whether target ``t`` is a byte of the
    document (False only in the padded tail of a document's last window).

    Attributes:
        seq_len: Number of inputs (and targets) per window.
    """

    seq_len: int

    def __post_init__(self):
        object.__setattr__(self, "seq_len", check_positive_length(self.seq_len, "seq_len"))

    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """``{"tokens": int32 (seq_len + 1,), "token_mask": bool (seq_len,)}``."""
        return {
            "tokens": jax.ShapeDtypeStruct((self.seq_len + 1,), jnp.int32),
            "token_mask": jax.ShapeDtypeStruct((self.seq_len,), jnp.bool_),
        }

    def check(
        self, example: dict[str, Any], *, split: str, index: int, num_classes: int | None
    ) -> None:
        """Checks the tokens' shape, dtype and range [0, num_classes) and the mask's shape and dtype.

        Raises:
            ValueError: Naming the split, the example's index and the bad value.
        """
        check_tokens(example["tokens"], (self.seq_len + 1,), num_classes, split=split, index=index)
        mask = np.asarray(example["token_mask"])
        if mask.shape != (self.seq_len,) or mask.dtype != np.bool_:
            raise ValueError(
                f"{split} example {index} has a token_mask of shape {mask.shape} and dtype "
                f"{mask.dtype}; expected bool of shape ({self.seq_len},)"
            )

    def prepare(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        """The int32 tokens and the bool token mask."""
        return {
            "tokens": np.asarray(example["tokens"], np.int32),
            "token_mask": np.asarray(example["token_mask"], np.bool_),
        }

    def padding(self, example: dict[str, Any]) -> dict[str, Any]:
        """A window of zero tokens whose targets are all masked out."""
        del example  # Every window has the same shape.
        return {
            "tokens": np.zeros(self.seq_len + 1, np.int32),
            "token_mask": np.zeros(self.seq_len, np.bool_),
        }


@dataclasses.dataclass(frozen=True)
class PassageFeatures:
    """One passage of bytes and one integer class label per example.

    A raw example is ``{"tokens": (length,) bytes as integers, "label": class index}``;
    the model-ready one is ``{"tokens": int32 (length,), "label": int32 ()}``.

    Attributes:
        length: Number of bytes in a passage.
        vocab_size: Exclusive upper bound of the tokens (the pipelines' num_classes
            bounds the labels).
    """

    length: int = PASSAGE_LENGTH
    vocab_size: int = BYTE_VOCAB

    def __post_init__(self):
        object.__setattr__(self, "length", check_positive_length(self.length, "length"))
        object.__setattr__(self, "vocab_size", check_positive_length(self.vocab_size, "vocab_size"))

    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """``{"tokens": int32 (length,), "label": int32 ()}``."""
        return {
            "tokens": jax.ShapeDtypeStruct((self.length,), jnp.int32),
            "label": jax.ShapeDtypeStruct((), jnp.int32),
        }

    def check(
        self, example: dict[str, Any], *, split: str, index: int, num_classes: int | None
    ) -> None:
        """Checks the tokens (shape, dtype, [0, vocab_size)) and the label (``check_label``).

        Raises:
            ValueError: Naming the split, the example's index and the bad value.
        """
        check_tokens(example["tokens"], (self.length,), self.vocab_size, split=split, index=index)
        check_label(example["label"], num_classes, split=split, index=index)

    def prepare(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        """The int32 tokens and the int32 label."""
        return {
            "tokens": np.asarray(example["tokens"], np.int32),
            "label": np.int32(example["label"]),
        }

    def padding(self, example: dict[str, Any]) -> dict[str, Any]:
        """A passage of zero tokens with label 0."""
        del example  # Every passage has the same shape.
        return {"tokens": np.zeros(self.length, np.int32), "label": 0}
