"""Researchers' own in-memory image arrays as a ``Dataset``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdq.data.core import Dataset, check_num_classes
from kdq.data.features import ImageFeatures
from kdq.data.sources import ArraySource


def _check_images(split: str, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            f"{split} images must have shape (N, H, W, C) or (N, H, W), got {images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{split} split is empty")
    if not np.issubdtype(images.dtype, np.number):
        raise ValueError(f"{split} images must be numeric, got dtype {images.dtype}")
    if np.issubdtype(images.dtype, np.complexfloating):
        raise ValueError(f"{split} images must be real, got dtype {images.dtype}")
    if np.issubdtype(images.dtype, np.floating):
        for word, bad in (("NaN", np.isnan), ("inf", np.isinf)):
            examples = np.flatnonzero(bad(images).any(axis=(1, 2, 3)))
            if examples.size:
                raise ValueError(
                    f"{split} images contain {word} (first in example {examples[0]}); "
                    "replace or drop those examples"
                )
    return images


def _check_labels(split: str, labels: np.ndarray, num_images: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != num_images:
        raise ValueError(
            f"{split} labels must have shape ({num_images},) to match the images, "
            f"got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{split} labels must be integers, got dtype {labels.dtype}")
    return labels


def _checked_splits(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each given split's checked (images, labels); every split like train's images."""
    given = {"train": train, "test": test}
    if validation is not None:
        given["validation"] = validation
    splits = {}
    for split, arrays in given.items():
        if not isinstance(arrays, (tuple, list)) or len(arrays) != 2:
            raise ValueError(
                f"{split} must be a pair (images, labels), got {type(arrays).__name__}"
            )
        images = _check_images(split, arrays[0])
        splits[split] = (images, _check_labels(split, arrays[1], len(images)))
    train_images = splits["train"][0]
    for split, (images, _) in splits.items():
        if images.shape[1:] != train_images.shape[1:]:
            raise ValueError(
                f"train images have shape {train_images.shape[1:]} per example but {split} "
                f"images {images.shape[1:]}"
            )
        if images.dtype != train_images.dtype:
            raise ValueError(
                f"train images have dtype {train_images.dtype} but {split} images {images.dtype}"
            )
    return splits


def _checked_num_classes(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int | None
) -> int:
    """The given number of classes, or the largest label plus one; every label below it."""
    if num_classes is None:
        num_classes = max(int(labels.max()) for _, labels in splits.values()) + 1
    num_classes = check_num_classes(num_classes)
    for split, (_, labels) in splits.items():
        outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if outside.size:
            index = int(outside[0])
            raise ValueError(
                f"{split} label {int(labels[index])} at index {index} is outside "
                f"[0, {num_classes}) ({split} labels span [{labels.min()}, {labels.max()}]); "
                "fix the labels or pass num_classes covering every class"
            )
    return num_classes


def from_arrays(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    num_classes: int | None = None,
    name: str = "arrays",
    pixel_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Dataset:
    """Wraps in-memory images and labels as a ``Dataset`` (arrays are not copied).

    Args:
        train: (images, labels) of the training split; images of shape
            (N, H, W, C) or (N, H, W) (a channel axis is added), labels of shape
            (N,) with integer dtype.
        test: (images, labels) of the evaluation split, same image shape and dtype.
        validation: (images, labels) of the validation split that recipes and
            checkpoints are chosen on, same image shape and dtype; None (default)
            leaves ``Dataset.validation`` None. kdq does not check that the
            splits are disjoint.
        num_classes: Number of classes; defaults to the largest label of any
            split plus one.
        name: Name of the returned dataset.
        pixel_scale: Value images are divided by to map them to [0, 1]; defaults
            to 255 for uint8 images and 1 for every other dtype.
        mean: Per-channel mean of the images scaled to [0, 1], kept in the
            features (``features.normalized()`` standardises with it); None
            (default) for none.
        std: Per-channel standard deviation, given exactly when ``mean`` is.

    Returns:
        A ``Dataset`` whose sources return the given arrays' rows, with
        ``ImageFeatures(shape=(H, W, C), pixel_scale, mean, std)`` (normalisation
        off).

    Raises:
        ValueError: On a wrong shape or dtype, NaN or inf pixels, mismatched
            splits, labels outside [0, num_classes), a num_classes that is not a
            positive integer, a non-positive pixel_scale, or mean and std that
            are not both None or both valid per channel.
    """
    splits = _checked_splits(train, test, validation)
    num_classes = _checked_num_classes(splits, num_classes)
    train_images = splits["train"][0]
    if pixel_scale is None:
        pixel_scale = 255.0 if train_images.dtype == np.uint8 else 1.0
    features = ImageFeatures(train_images.shape[1:], pixel_scale, mean, std)
    sources = {
        split: ArraySource(images, labels, num_classes=num_classes, split=f"{name} {split}")
        for split, (images, labels) in splits.items()
    }
    return Dataset(name=name, features=features, num_classes=num_classes, **sources)
