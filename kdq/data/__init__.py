"""Datasets and grain input pipelines for any kind of example, without TensorFlow.

A ``Dataset`` is splits of raw examples plus the ``Features`` that check them and make
them model-ready; ``ImageFeatures`` (one image, one class label) is what every loader
here gives: the embedded digits, TFDS catalog datasets and ``from_arrays``.
"""

from kdq.data.arrays import from_arrays
from kdq.data.augment import Augment, RandomAugment, pad_and_crop
from kdq.data.catalog import (
    CATALOG,
    CatalogEntry,
    DatasetNotPreparedError,
    default_augment,
    prepare_command,
)
from kdq.data.core import (
    Dataset,
    Example,
    ExampleSource,
    check_num_classes,
    default_data_dir,
)
from kdq.data.digits import load_digits
from kdq.data.features import (
    Features,
    ImageExample,
    ImageFeatures,
    check_label,
    check_mean_std,
)
from kdq.data.geometry import resize_and_center_crop, resize_bilinear, sample_inception_box
from kdq.data.load import load_dataset
from kdq.data.pipeline import Batch, eval_batches, train_batches
from kdq.data.sources import ArraySource, TfdsSource

__all__ = [
    "CATALOG",
    "ArraySource",
    "Augment",
    "Batch",
    "CatalogEntry",
    "Dataset",
    "DatasetNotPreparedError",
    "Example",
    "ExampleSource",
    "Features",
    "ImageExample",
    "ImageFeatures",
    "RandomAugment",
    "TfdsSource",
    "check_label",
    "check_mean_std",
    "check_num_classes",
    "default_augment",
    "default_data_dir",
    "eval_batches",
    "from_arrays",
    "load_dataset",
    "load_digits",
    "pad_and_crop",
    "prepare_command",
    "resize_and_center_crop",
    "resize_bilinear",
    "sample_inception_box",
    "train_batches",
]
