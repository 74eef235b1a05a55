"""Random-access example sources over in-memory arrays and TFDS data sources."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdq.data.core import Dataset
from kdq.data.features import ImageExample, ImageFeatures, check_label
from kdq.data.geometry import resize_and_center_crop


class ArraySource:
    """Examples backed by in-memory arrays; labels become Python ints after ``check_label``.

    Args:
        images: Array of shape (N, H, W, C).
        labels: Integer array of shape (N,).
        num_classes: Number of classes, kept as ``num_classes``: the pipelines
            check every label against it; None checks only that labels are
            non-negative scalar integers.
        split: Name of the split, kept as ``split`` for error messages.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        num_classes: int | None = None,
        split: str = "arrays",
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self._images = images
        self._labels = labels
        self.num_classes = num_classes
        self.split = split

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> ImageExample:
        label = check_label(self._labels[index], self.num_classes, split=self.split, index=index)
        return {"image": self._images[index], "label": label}


class TfdsSource:
    """Examples from a TFDS random-access data source with image and label features.

    Extra features (e.g. "id") are dropped, grayscale images get a channel axis and
    labels become Python ints after ``check_label``.

    Args:
        records: A TFDS data source (``tfds.data_source`` / ``as_data_source``)
            whose items are dicts with "image" and "label".
        image_size: If given, every image is resized and centre-cropped to
            ``image_size`` x ``image_size`` by ``resize_and_center_crop``, for
            datasets whose images vary in size or are wanted at another size.
        crop_fraction: Fraction of the resized shorter side the square keeps
            (0.875 is the standard ImageNet evaluation crop); used with
            ``image_size`` only.
        num_classes: Number of classes, kept as ``num_classes``: the pipelines
            check every label against it; None checks only that labels are
            non-negative scalar integers.
        split: Name of the split, e.g. "cifar10 train[:90%]", kept as ``split``
            for error messages.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        image_size: int | None = None,
        crop_fraction: float = 1.0,
        *,
        num_classes: int | None = None,
        split: str = "tfds",
    ):
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must lie in (0, 1], got {crop_fraction}")
        self._records = records
        self._image_size = image_size
        self._crop_fraction = crop_fraction
        self.num_classes = num_classes
        self.split = split

    @property
    def raw(self) -> TfdsSource:
        """The same examples with images at their stored size."""
        return TfdsSource(self._records, num_classes=self.num_classes, split=self.split)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> ImageExample:
        record = self._records[int(index)]
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if self._image_size is not None:
            image = resize_and_center_crop(image, self._image_size, self._crop_fraction)
        label = check_label(record["label"], self.num_classes, split=self.split, index=int(index))
        return {"image": image, "label": label}


def tfds_dataset(
    name: str,
    specs: Mapping[str, str],
    records: Sequence[Sequence[Mapping[str, Any]]],
    features: ImageFeatures,
    num_classes: int,
    image_size: int | None = None,
    crop_fraction: float = 1.0,
) -> Dataset:
    """A ``Dataset`` of ``TfdsSource`` splits.

    Args:
        name: Dataset name; a split's error messages call it "<name> <spec>".
        specs: "train", "validation" and "test", each to its TFDS split spec.
        records: The TFDS data source of each split, in the order of ``specs``.
        features: The dataset's image features (their shape is the sources').
        num_classes: Number of classes, checked against every label.
        image_size: As for ``TfdsSource``: None keeps the stored size.
        crop_fraction: As for ``TfdsSource``.

    Returns:
        The dataset with one ``TfdsSource`` per split.
    """
    return Dataset(
        name=name,
        features=features,
        num_classes=num_classes,
        **{
            role: TfdsSource(
                split_records,
                image_size,
                crop_fraction,
                num_classes=num_classes,
                split=f"{name} {spec}",
            )
            for (role, spec), split_records in zip(specs.items(), records, strict=True)
        },
    )
