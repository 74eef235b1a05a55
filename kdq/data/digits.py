"""scikit-learn's 8x8 handwritten digits as an embedded, TensorFlow-free TFDS dataset.

The 1797 images ship inside scikit-learn, so the dataset is built offline: once,
into ``<data_dir>/digits/2.0.0`` as array_record files, and read back through
``as_data_source`` (random access, no TensorFlow).

Splits, each stratified by class with ``sklearn.model_selection.train_test_split``
and stored in the order that function returns them:

- test: 20% of all 1797 images (``test_size=0.2``, ``random_state=0``), 360
  examples, per class 36 36 35 37 36 37 36 36 35 36 (digits 0..9). The same
  examples in the same order as version 1.0.0's test split.
- validation: 20% of the remaining 1437 (``test_size=0.2``, ``random_state=0``),
  288 examples, per class 29 29 28 29 29 29 29 29 28 29.
- train: the other 1149 examples, per class 113 117 114 117 116 116 116 114 111 115.

Version 1.0.0 had no validation split: its train split held all 1437 non-test
examples. The version names the cache directory, so a 1.0.0 build is never read
as 2.0.0.

Concurrent builds: TFDS writes every build into its own
``<data_dir>/digits/incomplete.<random>_2.0.0`` directory and renames it to
``2.0.0`` only when complete, so readers never see partial data. When two
processes build at once, the slower rename fails because the target already
exists; that process then reads the finished copy written by the faster one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from sklearn.datasets import load_digits as sklearn_load_digits
from sklearn.model_selection import train_test_split

from kdq.data.core import Dataset, default_data_dir, prepare_builder
from kdq.data.features import ImageFeatures
from kdq.data.sources import tfds_dataset

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
PIXEL_SCALE = 16.0
TEST_FRACTION = 0.2
"""Fraction of all images held out as the test split."""
SPLIT_SEED = 0
"""``random_state`` of the train/test split."""
VALIDATION_FRACTION = 0.2
"""Fraction of the non-test images held out as the validation split."""
VALIDATION_SEED = 0
"""``random_state`` of the train/validation split of the non-test images."""


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns the stratified train/validation/test row indices into scikit-learn's arrays.

    Args:
        labels: The ``target`` array of ``sklearn.datasets.load_digits()``.

    Returns:
        (train_rows, validation_rows, test_rows), each a 1-D int array in storage
        order; together they hold every row exactly once.
    """
    rest, test_rows = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    train_rows, validation_rows = train_test_split(
        rest,
        test_size=VALIDATION_FRACTION,
        stratify=labels[rest],
        random_state=VALIDATION_SEED,
    )
    return train_rows, validation_rows, test_rows


class DigitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for scikit-learn's digits; needs neither network nor TensorFlow."""

    name = "digits"
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Stratified 80/20 train/test split of sklearn's load_digits.",
        "2.0.0": "Stratified 80/20 train/validation split of 1.0.0's train split; test unchanged.",
    }
    # TFDS's own lookup of this path imports `importlib_resources`, which it only
    # requires on Python < 3.9; the path just locates a (nonexistent) checksums file.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="8x8 grayscale handwritten digits, pixel values 0..16.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
            disable_shuffling=True,
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # The data ships with scikit-learn.
        digits = sklearn_load_digits()
        images = digits.images.astype(np.uint8)[..., None]
        train_rows, validation_rows, test_rows = split_indices(digits.target)
        return {
            "train": self._generate_examples(images, digits.target, train_rows),
            "validation": self._generate_examples(images, digits.target, validation_rows),
            "test": self._generate_examples(images, digits.target, test_rows),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for position, row in enumerate(rows):
            yield position, {"image": images[row], "label": int(labels[row])}


def prepare_digits(data_dir: str) -> DigitsBuilder:
    """Builds the digits dataset into ``data_dir`` unless it is already there.

    Args:
        data_dir: Root TFDS data directory.

    Returns:
        A builder whose data is prepared in ``data_dir``.

    Raises:
        OSError: If writing fails for a reason other than a concurrent build
            finishing first.
    """
    return prepare_builder(DigitsBuilder, data_dir)


def load_digits(data_dir: str | None = None, image_size: int | None = None) -> Dataset:
    """Loads the embedded digits dataset, building it on first use.

    Args:
        data_dir: Root TFDS data directory; defaults to ``default_data_dir()``.
        image_size: If given, images are resized bilinearly to this square side.

    Returns:
        A ``Dataset`` named "digits": uint8 images of shape (8, 8, 1) (or the
        requested size) with values 0..16, labels 0..9, 1149 train, 288
        validation and 360 test examples (module docstring); its
        ``ImageFeatures`` have ``pixel_scale`` 16 and no mean or std.
    """
    builder = prepare_digits(data_dir or default_data_dir())
    specs = {name: name for name in ("train", "validation", "test")}
    records = builder.as_data_source(split=list(specs.values()))
    shape = IMAGE_SHAPE if image_size is None else (image_size, image_size, 1)
    features = ImageFeatures(shape, PIXEL_SCALE)
    return tfds_dataset("digits", specs, records, features, NUM_CLASSES, image_size)
