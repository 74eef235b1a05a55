"""The common return type of every dataset loader and the default cache directory."""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol, TypedDict

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
    """A random-access split: ``len(source)`` examples, ``source[i]`` in any order."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An image classification dataset with a train and a test split.

    Attributes:
        name: Dataset name, e.g. "digits" or "cifar10".
        train: Random-access source of the training split.
        test: Random-access source of the evaluation split.
        num_classes: Number of classes; every label lies in [0, num_classes).
        image_shape: (H, W, C) of every image in both splits.
        pixel_scale: Largest raw pixel value; images are divided by it to map them
            to [0, 1] (16 for digits, 255 for 8-bit images).
    """

    name: str
    train: ExampleSource
    test: ExampleSource
    num_classes: int
    image_shape: tuple[int, int, int]
    pixel_scale: float


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
