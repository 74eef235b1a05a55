"""Single entry point that loads any dataset kdq knows by name."""

from __future__ import annotations

from kdq.data.catalog import load_catalog_dataset
from kdq.data.core import Dataset
from kdq.data.digits import load_digits


def load_dataset(
    name: str, *, data_dir: str | None = None, image_size: int | None = None
) -> Dataset:
    """Loads a dataset for training and evaluation.

    Args:
        name: "digits" for the embedded scikit-learn digits (built on first use);
            any other name is a TFDS dataset (mnist, fashion_mnist, cifar10,
            cifar100, imagenet2012, ...) that must already be prepared as
            array_record files.
        data_dir: Root TFDS data directory; defaults to ``$KDQ_DATA_DIR`` or
            ``~/.cache/kdq/tensorflow_datasets``.
        image_size: Side of the square images the sources return. imagenet2012
            defaults to 224 and gets the standard evaluation crop (shorter side
            resized to ``round(image_size / 0.875)``, centre crop); any other
            dataset keeps its stored size unless this is given, and is then
            resized (centre-cropped to a square first if it is not one).

    Returns:
        The ``Dataset`` with random-access train, validation and test sources
        (digits: a stratified split, ``kdq.data.digits``; TFDS datasets: their
        own validation split or the last 10% of train, ``kdq.data.catalog``)
        and, for mnist, fashion_mnist, cifar10, cifar100 and imagenet2012, the
        standard per-channel ``mean`` and ``std``.

    Raises:
        ValueError: If the name is unknown or not an image classification
            dataset, or image_size is not positive.
        DatasetNotPreparedError: If a TFDS dataset is not prepared in ``data_dir``.
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if name == "digits":
        return load_digits(data_dir, image_size)
    return load_catalog_dataset(name, data_dir, image_size)
