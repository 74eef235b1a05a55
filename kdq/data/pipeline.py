"""grain input pipelines: an endless, resumable training stream and padded eval passes.

Training order: epoch ``e`` visits the split in the order
``np.random.default_rng([seed, e]).permutation(n)`` and keeps its first
``(n // batch_size) * batch_size`` examples, so every batch belongs to one epoch
and the remainder (a different one each epoch) is dropped. Example position
``p`` of the stream (batch ``p // batch_size``) is therefore a pure function of
``(seed, p)``, and so is its augmentation, whose grain generator is seeded from
``seed`` and ``p``. Resuming at step ``k`` just starts reading at position
``k * batch_size``.

Each example is read (from the source's ``raw`` images when the Inception crop
is on and the source has them) and checked: its label must be a scalar integer
in [0, num_classes) (``check_label``) and a floating-point image must be finite,
else a ValueError names the split, the example's index in it and the value; grain
re-raises it unchanged from its reader threads. The example is then augmented,
divided by the pixel scale into [0, 1] and, when ``mean`` and ``std`` are given,
normalised per channel as ``(x - mean) / std``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from kdq.data.augment import Augment, RandomAugment
from kdq.data.core import Dataset, Example, ExampleSource, check_label, check_mean_std

Batch = dict[str, np.ndarray]

SPLITS = ("train", "validation", "test")
"""Names of a ``Dataset``'s splits."""


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class _Checked:
    """Reads one example of a split and checks its label and pixels.

    Attributes:
        source: The split.
        split: Its name in error messages.
        num_classes: Upper bound (exclusive) of the labels, or None.
    """

    source: ExampleSource
    split: str
    num_classes: int | None

    def read(self, index: int) -> Example:
        example = self.source[index]
        label = check_label(example["label"], self.num_classes, split=self.split, index=index)
        image = example["image"]
        if np.issubdtype(np.asarray(image).dtype, np.floating) and not np.isfinite(image).all():
            raise ValueError(
                f"{self.split} example {index} has a NaN or inf pixel; replace or drop it"
            )
        return {**example, "label": label}


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
    """Reads examples in order; positions past the end give masked zero examples."""

    def __init__(self, read: _Checked):
        self._read = read
        self._num_examples = len(read.source)
        self._padding_image = np.zeros_like(read.source[0]["image"]) if self._num_examples else None

    def map(self, position: int) -> dict[str, Any]:
        if position < self._num_examples:
            return {**self._read.read(position), "mask": np.True_}
        return {"image": self._padding_image, "label": 0, "mask": np.False_}


class _Normalize(grain.transforms.Map):
    """Scales pixels to float32 in [0, 1], optionally standardises them, casts labels.

    Args:
        pixel_scale: Divisor mapping raw pixels to [0, 1].
        mean: Per-channel mean subtracted after scaling, or None.
        std: Per-channel standard deviation divided by after subtracting ``mean``.
    """

    def __init__(
        self,
        pixel_scale: float,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ):
        self._pixel_scale = np.float32(pixel_scale)
        self._mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self._std = None if std is None else np.asarray(std, dtype=np.float32)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(element["image"], dtype=np.float32) / self._pixel_scale
        if self._mean is not None:
            image = (image - self._mean) / self._std
        return {**element, "image": image, "label": np.int32(element["label"])}


def _resolve(
    data: Dataset | ExampleSource,
    pixel_scale: float | None,
    split: str,
    num_classes: int | None,
) -> tuple[ExampleSource, float, _Checked]:
    """The split's source, its pixel scale and its checked reader."""
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(data, Dataset):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        source = getattr(data, split)
        if source is None:
            raise ValueError(
                f"dataset {data.name!r} has no {split} split; pass validation arrays to "
                "from_arrays, or evaluate split='test'"
            )
        pixel_scale = data.pixel_scale if pixel_scale is None else pixel_scale
        known = data.num_classes
        name = f"{data.name} {split}"
    elif pixel_scale is None:
        raise ValueError("pixel_scale is required when passing a source instead of a Dataset")
    else:
        source = data
        known = getattr(source, "num_classes", None)
        name = getattr(source, "split", None) or "source"
    if not pixel_scale > 0 or not np.isfinite(pixel_scale):
        raise ValueError(f"pixel_scale must be positive and finite, got {pixel_scale}")
    if num_classes is not None and known is not None and num_classes != known:
        raise ValueError(
            f"num_classes={num_classes} but the {name} split has {known} classes; "
            "omit num_classes or pass the same number"
        )
    checked = _Checked(source, name, known if num_classes is None else int(num_classes))
    return source, float(pixel_scale), checked


def _image_shape(data: Dataset | ExampleSource, source: ExampleSource) -> tuple[int, ...]:
    if isinstance(data, Dataset):
        return data.image_shape
    return source[0]["image"].shape


def _check_mean_std(
    data: Dataset | ExampleSource,
    source: ExampleSource,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> None:
    if mean is not None or std is not None:
        check_mean_std(mean, std, _image_shape(data, source)[2])


def _read_options(num_threads: int, batch_size: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size)


def train_batches(
    data: Dataset | ExampleSource,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    augment: Augment | None = None,
    pixel_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    num_threads: int = 4,
) -> Iterator[Batch]:
    """Endless stream of shuffled training batches, resumable at any step.

    Args:
        data: A ``Dataset`` (its train split is used) or an example source.
        batch_size: Examples per batch; at most the split size.
        seed: Non-negative integer fixing the shuffle and augmentation streams.
        start_step: Index of the first batch to yield; the stream equals the
            uninterrupted stream from that batch on, and starting costs nothing.
        augment: Augmentations to apply to raw images; None applies none
            (``default_augment(name)`` gives a dataset's standard one). With
            the Inception crop, images are read from the source's ``raw``
            attribute when it has one and cropped to the source's image size.
        pixel_scale: Divisor mapping raw pixels to [0, 1]; defaults to the
            Dataset's and is required for a bare source.
        mean: Per-channel mean subtracted from the pixels scaled to [0, 1]
            (pass ``dataset.mean``); None with std None skips normalisation.
        std: Per-channel standard deviation the centred pixels are divided by
            (pass ``dataset.std``); given exactly when mean is.
        num_classes: Labels must lie in [0, num_classes); defaults to the
            Dataset's, else the source's ``num_classes`` attribute (every kdq
            source has one), else only non-negativity is checked.
        num_threads: grain reader threads (0 reads in the calling thread).

    Returns:
        An infinite iterator of dicts with "image": float32 (B, H, W, C) and
        "label": int32 (B,). Every epoch is a fresh permutation of the split
        truncated to a multiple of ``batch_size``.

    Raises:
        ValueError: If batch_size is not in [1, split size], seed or start_step
            is negative, pixel_scale is missing or not positive, mean and std
            are not both None or both valid per channel, or num_classes is not
            a positive integer or contradicts the data's. While iterating: if
            an example's label is not a scalar integer in [0, num_classes) or
            its floating-point image is not finite.
    """
    source, pixel_scale, checked = _resolve(data, pixel_scale, "train", num_classes)
    num_examples = len(source)
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size={batch_size} must be between 1 and the split size {num_examples}"
        )
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    _check_mean_std(data, source, mean, std)
    examples_per_epoch = num_examples // batch_size * batch_size
    read, image_size = checked, None
    if augment is not None and augment.inception_crop:
        read = dataclasses.replace(checked, source=getattr(source, "raw", source))
        image_size = _image_shape(data, source)[:2]
    examples = grain.MapDataset.range(sys.maxsize).map(
        _ReadShuffled(read, examples_per_epoch, seed)
    )
    if augment is not None and augment.enabled:
        examples = examples.random_map(RandomAugment(augment, image_size), seed=seed)
    examples = examples[start_step * batch_size :].map(_Normalize(pixel_scale, mean, std))
    batches = examples.to_iter_dataset(_read_options(num_threads, batch_size)).batch(batch_size)
    return iter(batches)


def eval_batches(
    data: Dataset | ExampleSource,
    *,
    batch_size: int,
    split: str = "test",
    pixel_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    num_threads: int = 4,
) -> Iterator[Batch]:
    """One ordered pass over a split in equally shaped, masked batches.

    Args:
        data: A ``Dataset`` (its ``split`` is used) or an example source.
        batch_size: Examples per batch.
        split: "test", "validation" or "train": which split of a ``Dataset``
            to read; ignored for a bare source.
        pixel_scale: Divisor mapping raw pixels to [0, 1]; defaults to the
            Dataset's and is required for a bare source.
        mean: Per-channel mean subtracted from the pixels scaled to [0, 1]
            (pass ``dataset.mean``); None with std None skips normalisation.
        std: Per-channel standard deviation the centred pixels are divided by
            (pass ``dataset.std``); given exactly when mean is.
        num_classes: Labels must lie in [0, num_classes); defaults to the
            Dataset's, else the source's ``num_classes`` attribute (every kdq
            source has one), else only non-negativity is checked.
        num_threads: grain reader threads (0 reads in the calling thread).

    Returns:
        An iterator of ``ceil(n / batch_size)`` dicts with "image": float32
        (B, H, W, C), "label": int32 (B,) and "mask": bool (B,). The last batch
        is padded with zero raw images (normalised like the others) and label 0
        whose mask is False.

    Raises:
        ValueError: If batch_size is not positive, split is not a split of the
            Dataset, pixel_scale is missing or not positive, mean and std are
            not both None or both valid per channel, or num_classes is not a
            positive integer or contradicts the data's. While iterating: if an
            example's label is not a scalar integer in [0, num_classes) or its
            floating-point image is not finite.
    """
    source, pixel_scale, checked = _resolve(data, pixel_scale, split, num_classes)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_mean_std(data, source, mean, std)
    num_batches = -(-len(source) // batch_size)
    examples = (
        grain.MapDataset.range(num_batches * batch_size)
        .map(_ReadPadded(checked))
        .map(_Normalize(pixel_scale, mean, std))
    )
    batches = examples.to_iter_dataset(_read_options(num_threads, batch_size)).batch(batch_size)
    return iter(batches)
