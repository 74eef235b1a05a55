"""Single entry point that loads any dataset kdq knows by name."""

from __future__ import annotations

from kdq.data.catalog import load_catalog_dataset
from kdq.data.core import Dataset
from kdq.data.digits import load_digits


def load_dataset(name: str, *, data_dir: str | None = None) -> Dataset:
    """Loads a dataset for training and evaluation.

    Args:
        name: "digits" for the embedded scikit-learn digits (built on first use);
            any other name is a TFDS dataset (mnist, fashion_mnist, cifar10,
            cifar100, imagenet2012, ...) that must already be prepared as
            array_record files.
        data_dir: Root TFDS data directory; defaults to ``$KDQ_DATA_DIR`` or
            ``~/.cache/kdq/tensorflow_datasets``.

    Returns:
        The ``Dataset`` with random-access train and test sources.

    Raises:
        ValueError: If the name is unknown or not an image classification dataset.
        DatasetNotPreparedError: If a TFDS dataset is not prepared in ``data_dir``.
    """
    if name == "digits":
        return load_digits(data_dir)
    return load_catalog_dataset(name, data_dir)
