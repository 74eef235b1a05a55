"""Researchers' own in-memory image arrays as a ``Dataset``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdq.data.core import Dataset
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
        if np.isnan(images).any():
            raise ValueError(f"{split} images contain NaN")
        if np.isinf(images).any():
            raise ValueError(f"{split} images contain inf")
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


def from_arrays(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
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
        num_classes: Number of classes; defaults to the largest label plus one.
        name: Name of the returned dataset.
        pixel_scale: Value images are divided by to map them to [0, 1]; defaults
            to 255 for uint8 images and 1 for every other dtype.
        mean: Per-channel mean of the images scaled to [0, 1], kept as
            ``Dataset.mean``; None (default) for no normalisation.
        std: Per-channel standard deviation, given exactly when ``mean`` is.

    Returns:
        A ``Dataset`` whose sources return the given arrays' rows.

    Raises:
        ValueError: On a wrong shape or dtype, NaN or inf pixels, mismatched
            splits, labels outside [0, num_classes), a non-positive pixel_scale,
            or mean and std that are not both None or both valid per channel.
    """
    train_images = _check_images("train", train[0])
    test_images = _check_images("test", test[0])
    train_labels = _check_labels("train", train[1], len(train_images))
    test_labels = _check_labels("test", test[1], len(test_images))
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"train images have shape {train_images.shape[1:]} per example but test "
            f"images {test_images.shape[1:]}"
        )
    if train_images.dtype != test_images.dtype:
        raise ValueError(
            f"train images have dtype {train_images.dtype} but test images {test_images.dtype}"
        )
    low = min(train_labels.min(), test_labels.min())
    high = max(train_labels.max(), test_labels.max())
    if num_classes is None:
        num_classes = int(high) + 1
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found values in [{low}, {high}]")
    if pixel_scale is None:
        pixel_scale = 255.0 if train_images.dtype == np.uint8 else 1.0
    if not pixel_scale > 0 or not np.isfinite(pixel_scale):
        raise ValueError(f"pixel_scale must be positive and finite, got {pixel_scale}")
    height, width, channels = train_images.shape[1:]
    return Dataset(
        name=name,
        train=ArraySource(train_images, train_labels),
        test=ArraySource(test_images, test_labels),
        num_classes=num_classes,
        image_shape=(height, width, channels),
        pixel_scale=float(pixel_scale),
        mean=None if mean is None else tuple(map(float, mean)),
        std=None if std is None else tuple(map(float, std)),
    )
