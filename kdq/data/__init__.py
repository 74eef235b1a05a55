"""Datasets and grain input pipelines for any kind of example, without TensorFlow.

A ``Dataset`` is splits of raw examples plus the ``Features`` that check them and make
them model-ready. ``ImageFeatures`` (one image, one class label) is what the image
loaders give: the embedded digits, TFDS catalog datasets and ``from_arrays``. Text is
bytes (``kdq.data.text``): ``TokenFeatures`` windows for next-byte prediction (the
embedded Shakespeare plays, a directory of text files, a TFDS text dataset) and
``PassageFeatures`` for passages labelled by class (the plays' genres).
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
from kdq.data.shakespeare import load_shakespeare_char, load_shakespeare_genre
from kdq.data.sources import ArraySource, TfdsSource
from kdq.data.text import (
    BYTE_VOCAB,
    PassageFeatures,
    PassageSource,
    TokenFeatures,
    WindowSource,
    passages,
    windows,
)
from kdq.data.text_dir import load_text_directory
from kdq.data.text_tfds import load_tfds_text

__all__ = [
    "BYTE_VOCAB",
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
    "PassageFeatures",
    "PassageSource",
    "RandomAugment",
    "TfdsSource",
    "TokenFeatures",
    "WindowSource",
    "check_label",
    "check_mean_std",
    "check_num_classes",
    "default_augment",
    "default_data_dir",
    "eval_batches",
    "from_arrays",
    "load_dataset",
    "load_digits",
    "load_shakespeare_char",
    "load_shakespeare_genre",
    "load_text_directory",
    "load_tfds_text",
    "pad_and_crop",
    "passages",
    "prepare_command",
    "resize_and_center_crop",
    "resize_bilinear",
    "sample_inception_box",
    "train_batches",
    "windows",
]
