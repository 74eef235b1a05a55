"""grain input pipelines: an endless, resumable training stream and padded eval passes.

The pipelines are the same for every kind of example: a ``Features`` object (the
Dataset's, or the ``features`` argument) checks each raw example as it is read,
turns it into model-ready numpy arrays (``prepare``) and says how to pad an
evaluation batch; a batch stacks the prepared examples along a new leading axis.

Training order: epoch ``e`` visits the split in the order
``np.random.default_rng([seed, e]).permutation(n)`` and keeps its first
``(n // batch_size) * batch_size`` examples, so every batch belongs to one epoch
and the remainder (a different one each epoch) is dropped. Example position
``p`` of the stream (batch ``p // batch_size``) is therefore a pure function of
``(seed, p)``, and so is its augmentation, whose grain generator is seeded from
``seed`` and ``p``. Resuming at step ``k`` just starts reading at position
``k * batch_size``.

Each example is read (for images: from the source's ``raw`` images when the
Inception crop is on and the source has them) and checked by ``features.check``
(``ImageFeatures``: the label must be a scalar integer in [0, num_classes),
``check_label``, and a floating-point image must be finite), else a ValueError
names the split, the example's index in it and the value; grain re-raises it
unchanged from its reader threads. The example is then augmented (images only)
and prepared (``ImageFeatures``: divided by the pixel scale into [0, 1] and, when
the features are ``normalized()``, standardised per channel as ``(x - mean) / std``).

Arguments both pipelines take:

- ``data``: a ``Dataset`` (the pipeline reads one of its splits) or a bare
  example source.
- ``batch_size``: examples per batch.
- ``features``: how examples are checked and prepared; defaults to the
  Dataset's and is required for a bare source (e.g.
  ``features=dataset.features.normalized()`` to standardise images).
- ``num_classes``: the examples' class indices must lie in [0, num_classes);
  defaults to the Dataset's, else the source's ``num_classes`` attribute (every
  kdq source has one), else only non-negativity is checked.
- ``num_threads``: grain reader threads (0 reads in the calling thread).

Both raise a ValueError if num_classes is not a positive integer or contradicts
the data's, or features is missing for a bare source or is not ``Features``;
and, while iterating, for an example that ``features.check`` rejects.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from kdq.data.augment import Augment, RandomAugment
from kdq.data.core import Dataset, Example, ExampleSource, check_features, check_num_classes
from kdq.data.features import Features, ImageFeatures

Batch = dict[str, np.ndarray]

SPLITS = ("train", "validation", "test")
"""Names of a ``Dataset``'s splits."""


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class _Checked:
    """Reads one example of a split and checks it.

    Attributes:
        source: The split.
        split: Its name in error messages.
        features: What checks each example.
        num_classes: Upper bound (exclusive) of the class indices, or None.
    """

    source: ExampleSource
    split: str
    features: Features
    num_classes: int | None

    def read(self, index: int) -> Example:
        example = self.source[index]
        self.features.check(example, split=self.split, index=index, num_classes=self.num_classes)
        return example


class _ReadShuffled(grain.transforms.Map):
    """Maps a stream position to the example it reads in the shuffled epoch order."""

    def __init__(self, read: _Checked, examples_per_epoch: int, seed: int):
        self._read = read
        self._num_examples = len(read.source)
        self._examples_per_epoch = examples_per_epoch
        self._seed = seed

    def map(self, position: int) -> Example:
        epoch, offset = divmod(position, self._examples_per_epoch)
        order = _epoch_permutation(self._num_examples, self._seed, epoch)
        return self._read.read(int(order[offset]))


class _ReadPadded(grain.transforms.Map):
    """Reads and prepares examples in order; positions past the end give masked padding."""

    def __init__(self, read: _Checked):
        self._read = read
        self._num_examples = len(read.source)
        features = read.features
        if self._num_examples:
            self._padding = features.prepare(features.padding(read.source[0]))

    def map(self, position: int) -> dict[str, Any]:
        if position < self._num_examples:
            return {**self._read.features.prepare(self._read.read(position)), "mask": np.True_}
        return {**self._padding, "mask": np.False_}


def _resolve(
    data: Dataset | ExampleSource,
    features: Features | None,
    split: str,
    num_classes: int | None,
) -> _Checked:
    """The checked reader of the split, with the features and class bound to use."""
    if num_classes is not None:
        check_num_classes(num_classes)
    if isinstance(data, Dataset):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        source = getattr(data, split)
        if source is None:
            raise ValueError(
                f"dataset {data.name!r} has no {split} split; pass validation arrays to "
                "from_arrays, or evaluate split='test'"
            )
        features = data.features if features is None else features
        known = data.num_classes
        name = f"{data.name} {split}"
    elif features is None:
        raise ValueError(
            "features is required when passing a source instead of a Dataset: pass "
            "features=dataset.features, or e.g. ImageFeatures(shape=(H, W, C), pixel_scale=255)"
        )
    else:
        source = data
        known = getattr(source, "num_classes", None)
        name = getattr(source, "split", None) or "source"
    check_features(features)
    if num_classes is not None and known is not None and num_classes != known:
        raise ValueError(
            f"num_classes={num_classes} but the {name} split has {known} classes; "
            "omit num_classes or pass the same number"
        )
    return _Checked(source, name, features, known if num_classes is None else int(num_classes))


def _read_options(num_threads: int, batch_size: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size)


def train_batches(
    data: Dataset | ExampleSource,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    augment: Augment | None = None,
    features: Features | None = None,
    num_classes: int | None = None,
    num_threads: int = 4,
) -> Iterator[Batch]:
    """Endless stream of shuffled training batches, resumable at any step.

    ``data`` (its train split, for a ``Dataset``), ``batch_size`` (at most the
    split size), ``features``, ``num_classes`` and ``num_threads`` are described
    in the module docstring.

    Args:
        seed: Non-negative integer fixing the shuffle and augmentation streams.
        start_step: Index of the first batch to yield; the stream equals the
            uninterrupted stream from that batch on, and starting costs nothing.
        augment: Augmentations to apply to raw images, which needs
            ``ImageFeatures``; None (or an ``Augment()`` with everything off)
            applies none (``default_augment(name)`` gives a dataset's standard
            one). With the Inception crop, images are read from the source's
            ``raw`` attribute when it has one and cropped to the features' image
            size.

    Returns:
        An infinite iterator of batches: each array of ``features.prepare``'s
        examples stacked to (B, ...) (``ImageFeatures``: "image" float32
        (B, H, W, C) and "label" int32 (B,)). Every epoch is a fresh permutation
        of the split truncated to a multiple of ``batch_size``.

    Raises:
        ValueError: As the module docstring says, and if batch_size is not in
            [1, split size], seed or start_step is negative, or augment enables
            an augmentation while the features are not ``ImageFeatures``.
    """
    checked = _resolve(data, features, "train", num_classes)
    source, features = checked.source, checked.features
    num_examples = len(source)
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size={batch_size} must be between 1 and the split size {num_examples}"
        )
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    augments = augment is not None and augment.enabled
    if augments and not isinstance(features, ImageFeatures):
        raise ValueError(
            f"augment={augment} transforms images, but the examples' features are "
            f"{type(features).__name__}, not ImageFeatures; pass augment=None"
        )
    examples_per_epoch = num_examples // batch_size * batch_size
    read, image_size = checked, None
    if augments and augment.inception_crop:
        read = dataclasses.replace(checked, source=getattr(source, "raw", source))
        image_size = features.shape[:2]
    examples = grain.MapDataset.range(sys.maxsize).map(
        _ReadShuffled(read, examples_per_epoch, seed)
    )
    if augments:
        examples = examples.random_map(RandomAugment(augment, image_size), seed=seed)
    examples = examples[start_step * batch_size :].map(features.prepare)
    batches = examples.to_iter_dataset(_read_options(num_threads, batch_size)).batch(batch_size)
    return iter(batches)


def eval_batches(
    data: Dataset | ExampleSource,
    *,
    batch_size: int,
    split: str = "test",
    features: Features | None = None,
    num_classes: int | None = None,
    num_threads: int = 4,
) -> Iterator[Batch]:
    """One ordered pass over a split in equally shaped, masked batches.

    ``data``, ``batch_size``, ``features``, ``num_classes`` and ``num_threads``
    are described in the module docstring.

    Args:
        split: "test", "validation" or "train": which split of a ``Dataset``
            to read; ignored for a bare source.

    Returns:
        An iterator of ``ceil(n / batch_size)`` batches: each array of
        ``features.prepare``'s examples stacked to (B, ...) (``ImageFeatures``:
        "image" float32 (B, H, W, C), "label" int32 (B,)) and "mask": bool
        (B,). The last batch is padded with ``features.prepare(
        features.padding(first example))`` (``ImageFeatures``: a zero raw image,
        prepared like the others, and label 0), whose mask is False.

    Raises:
        ValueError: As the module docstring says, and if batch_size is not
            positive or split is not a split of the Dataset.
    """
    checked = _resolve(data, features, split, num_classes)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num_batches = -(-len(checked.source) // batch_size)
    examples = grain.MapDataset.range(num_batches * batch_size).map(_ReadPadded(checked))
    batches = examples.to_iter_dataset(_read_options(num_threads, batch_size)).batch(batch_size)
    return iter(batches)
