"""The common return type of every dataset loader, its label check and the cache directory."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol, TypedDict

import numpy as np

DATA_DIR_ENV = "KDQ_DATA_DIR"
"""Environment variable that overrides the default data directory."""


class Example(TypedDict):
    """One example of an image classification split.

    Attributes:
        image: Raw pixels, shape (H, W, C), in the dataset's own dtype and scale.
        label: Class index in [0, num_classes).
    """

    image: np.ndarray
    label: int


class ExampleSource(Protocol):
    """A random-access split: ``len(source)`` examples, ``source[i]`` in any order.

    A source that resizes images of varying size to a fixed one may also have a
    ``raw`` attribute: a source of the same examples before resizing, which the
    Inception crop of ``train_batches`` reads instead.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An image classification dataset with train, test and (usually) validation splits.

    Recipes, hyperparameters and checkpoints are chosen on ``validation``; ``test``
    is only reported. The splits must be disjoint (every kdq loader makes them so;
    `from_arrays` takes the caller's word for it).

    Attributes:
        name: Dataset name, e.g. "digits" or "cifar10".
        train: Random-access source of the training split.
        test: Random-access source of the evaluation split.
        num_classes: Number of classes; every label lies in [0, num_classes).
        image_shape: (H, W, C) of every image in every split.
        pixel_scale: Largest raw pixel value; images are divided by it to map them
            to [0, 1] (16 for digits, 255 for 8-bit images).
        mean: Per-channel mean of the images scaled to [0, 1], which the
            pipelines subtract when passed ``mean=dataset.mean``; None (digits,
            arrays without statistics) means no normalisation.
        std: Per-channel standard deviation matching ``mean``, which the
            pipelines divide by; None exactly when ``mean`` is None.
        validation: Random-access source of the validation split, held out from
            the training data; None only for ``from_arrays`` without validation
            arrays.
    """

    name: str
    train: ExampleSource
    test: ExampleSource
    num_classes: int
    image_shape: tuple[int, int, int]
    pixel_scale: float
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    validation: ExampleSource | None = None

    def __post_init__(self):
        check_mean_std(self.mean, self.std, self.image_shape[2])


def check_mean_std(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> None:
    """Checks per-channel normalisation statistics.

    Args:
        mean: Per-channel means, or None for no normalisation.
        std: Per-channel standard deviations, or None for no normalisation.
        channels: Number of image channels.

    Raises:
        ValueError: If only one of mean and std is given, either has a length
            other than ``channels``, a mean is not finite or a std is not
            positive and finite.
    """
    if mean is None and std is None:
        return
    if mean is None or std is None:
        raise ValueError("mean and std must be given together")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}"
        )
    if not all(math.isfinite(m) for m in mean):
        raise ValueError(f"mean must be finite, got {tuple(mean)}")
    if not all(s > 0 and math.isfinite(s) for s in std):
        raise ValueError(f"std must be positive and finite, got {tuple(std)}")


def check_label(label: Any, num_classes: int | None, *, split: str, index: int) -> int:
    """Checks one example's label as it enters a pipeline.

    Args:
        label: The example's "label" value.
        num_classes: Number of classes, or None to check only that the label is
            a non-negative scalar integer.
        split: Name of the split or source, for the error message.
        index: Index of the example in that split, for the error message.

    Returns:
        The label as a Python int.

    Raises:
        ValueError: If the label is not a scalar integer (a float, a bool, an
            array of shape (1,), a one-hot vector) or lies outside
            [0, num_classes).
    """
    value = np.asarray(label)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(
            f"{split} example {index} has label {label!r} (dtype {value.dtype}, shape "
            f"{value.shape}); a label must be a scalar integer class index. Make the "
            "source return int(label), not a float, a bool, an array of shape (1,) or "
            "a one-hot vector."
        )
    result = int(value)
    if result < 0 or (num_classes is not None and result >= num_classes):
        bound = "" if num_classes is None else f", num_classes={num_classes}"
        raise ValueError(
            f"{split} example {index} has label {result}, outside "
            f"[0, {'num_classes' if num_classes is None else num_classes}){bound}. Fix the "
            "source's labels, or pass the dataset's true number of classes as num_classes."
        )
    return result


def default_data_dir() -> str:
    """Returns the directory where datasets are cached and looked up.

    Returns:
        ``$KDQ_DATA_DIR`` if that variable is set and non-empty, otherwise
        ``~/.cache/kdq/tensorflow_datasets`` (with ``~`` expanded).
    """
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return os.path.expanduser(from_env)
    return os.path.join(os.path.expanduser("~"), ".cache", "kdq", "tensorflow_datasets")
