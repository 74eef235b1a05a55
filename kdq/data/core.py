"""The common return type of every dataset loader, its checks and the cache directory."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import numpy as np

from kdq.data.features import Features

DATA_DIR_ENV = "KDQ_DATA_DIR"
"""Environment variable that overrides the default data directory."""


Example = dict[str, Any]
"""One raw example: feature name -> value, as a source returns it. Which names and
values are the dataset's ``Features``' business (``ImageFeatures``: "image" and "label",
``ImageExample``)."""


class ExampleSource(Protocol):
    """A random-access split: ``len(source)`` examples, ``source[i]`` in any order.

    A source of images that resizes images of varying size to a fixed one may
    also have a ``raw`` attribute: a source of the same examples before resizing,
    which the Inception crop of ``train_batches`` reads instead.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset with train, test and (usually) validation splits of one kind of example.

    Recipes, hyperparameters and checkpoints are chosen on ``validation``; ``test``
    is only reported. The splits must be disjoint (every kdq loader makes them so;
    `from_arrays` takes the caller's word for it).

    Attributes:
        name: Dataset name, e.g. "digits" or "cifar10".
        train: Random-access source of the training split.
        test: Random-access source of the evaluation split.
        features: What every example of every split holds and how the pipelines
            check and prepare it; ``ImageFeatures`` for every kdq loader (its
            image shape, pixel scale and, for the catalog datasets, per-channel
            mean and std).
        num_classes: The exclusive upper bound of the examples' class indices
            (labels; for token sequences, the vocabulary size) that the pipelines
            check; None when unknown.
        validation: Random-access source of the validation split, held out from
            the training data; None only for ``from_arrays`` without validation
            arrays.
    """

    name: str
    train: ExampleSource
    test: ExampleSource
    features: Features
    num_classes: int | None = None
    validation: ExampleSource | None = None

    def __post_init__(self):
        check_features(self.features)
        if self.num_classes is not None:
            check_num_classes(self.num_classes)


def check_features(features: Any) -> None:
    """Raises a ValueError unless ``features`` has the ``Features`` methods."""
    if not isinstance(features, Features):
        raise ValueError(
            f"features must implement kdq.data.Features (element_spec, check, prepare, "
            f"padding), got {features!r}; images take ImageFeatures(shape, pixel_scale)"
        )


def check_num_classes(num_classes: Any) -> int:
    """Returns ``num_classes`` as an int.

    Args:
        num_classes: The number of classes to check.

    Returns:
        ``int(num_classes)``.

    Raises:
        ValueError: If it is not a positive integer (a bool, float or string is not).
    """
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


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


def prepare_builder(builder_class: type, data_dir: str) -> Any:
    """Builds an embedded TFDS dataset into ``data_dir`` as array_record unless it is there.

    TFDS writes a build into its own ``incomplete.<random>`` directory and renames
    it into place when complete; when two processes build at once, the slower
    rename fails and that process reads the finished copy of the faster one.

    Args:
        builder_class: A ``tfds.core.GeneratorBasedBuilder`` that needs no download.
        data_dir: Root TFDS data directory.

    Returns:
        A builder whose data is prepared in ``data_dir``.

    Raises:
        OSError: If writing fails for a reason other than a concurrent build
            finishing first.
    """
    builder = builder_class(data_dir=data_dir, file_format="array_record")
    try:
        builder.download_and_prepare()
    except OSError:
        builder = builder_class(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise
    return builder
