"""TFDS catalog datasets (mnist, cifar10, imagenet2012, ...) read without TensorFlow.

Reading goes through TFDS's random-access data sources over array_record files
and never downloads anything. Preparing a catalog dataset is a separate,
one-off step: TFDS's generation code and its ``tfds`` command line need
TensorFlow, so it runs in any environment that has it and writes array_record
files that this module then reads.
"""

from __future__ import annotations

import dataclasses
import textwrap

import tensorflow_datasets as tfds

from kdq.data.core import Dataset, default_data_dir
from kdq.data.sources import TfdsSource

PIXEL_SCALE = 255.0


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """How kdq reads one TFDS dataset.

    Attributes:
        train_split: TFDS split used for training.
        test_split: TFDS split used for evaluation.
        image_size: (height, width) that images are centre-cropped and resized to,
            for datasets whose images vary in size; None keeps the stored size.
    """

    train_split: str = "train"
    test_split: str = "test"
    image_size: tuple[int, int] | None = None


CATALOG: dict[str, CatalogEntry] = {
    "mnist": CatalogEntry(),
    "fashion_mnist": CatalogEntry(),
    "cifar10": CatalogEntry(),
    "cifar100": CatalogEntry(),
    "imagenet2012": CatalogEntry(test_split="validation", image_size=(224, 224)),
}

KNOWN_DATASETS: tuple[str, ...] = ("digits", *CATALOG)
"""Names ``load_dataset`` documents; "digits" is embedded (``kdq.data.digits``)."""


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset has no array_record files in the data directory."""


def prepare_command(name: str, data_dir: str) -> str:
    """Returns the shell command that prepares a TFDS dataset for kdq.

    Args:
        name: TFDS dataset name.
        data_dir: Root TFDS data directory to write into.

    Returns:
        A ``tfds build`` command line writing array_record files.
    """
    return f"tfds build {name} --data_dir={data_dir} --file_format=array_record"


def _not_prepared_message(name: str, builder: tfds.core.DatasetBuilder, data_dir: str) -> str:
    lines = [
        f"Dataset {name!r} is not prepared in data_dir {data_dir!r} "
        f"(looked for {builder.data_dir}).",
        "Prepare it once in an environment with TensorFlow installed "
        "(pip install tensorflow tensorflow-datasets), then load it here:",
        f"    {prepare_command(name, data_dir)}",
    ]
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        lines.append(
            "This dataset needs a manual download; add --manual_dir=<dir> to the "
            "command, where:\n"
            + textwrap.indent(textwrap.dedent(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).strip(), "    ")
        )
    return "\n".join(lines)


def _wrong_format_message(name: str, builder: tfds.core.DatasetBuilder, data_dir: str) -> str:
    formats = ", ".join(sorted(f.value for f in builder.info.available_file_formats()))
    return (
        f"Dataset {name!r} in data_dir {data_dir!r} is stored as {formats}, which "
        "has no random access. Prepare an array_record copy (into an empty "
        "data_dir, or after deleting "
        f"{builder.data_dir}):\n    {prepare_command(name, data_dir)}"
    )


def _open_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: {', '.join(KNOWN_DATASETS)}. "
            "Any other TFDS dataset with 'image' and 'label' features works too."
        ) from None


def _test_split(builder: tfds.core.DatasetBuilder) -> str:
    splits = builder.info.splits
    if not splits or "test" in splits:
        return "test"
    if "validation" in splits:
        return "validation"
    raise ValueError(
        f"Dataset {builder.name!r} has neither a 'test' nor a 'validation' split "
        f"(splits: {', '.join(splits)})"
    )


def _image_shape(
    name: str, builder: tfds.core.DatasetBuilder, entry: CatalogEntry
) -> tuple[int, int, int]:
    features = builder.info.features
    names = set(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else set()
    if not {"image", "label"} <= names:
        raise ValueError(f"Dataset {name!r} has no 'image' and 'label' features")
    if not isinstance(features["label"], tfds.features.ClassLabel):
        raise ValueError(f"Dataset {name!r}: 'label' is not a ClassLabel feature")
    shape = tuple(features["image"].shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise ValueError(f"Dataset {name!r}: images have shape {shape}, expected (H, W, C)")
    if entry.image_size is not None:
        shape = (*entry.image_size, shape[2])
    if None in shape:
        raise ValueError(
            f"Dataset {name!r} has images of varying size {shape}; add a CatalogEntry "
            "with an image_size to kdq.data.catalog.CATALOG"
        )
    return shape


def load_catalog_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Opens a prepared TFDS dataset for random access; never downloads.

    Args:
        name: TFDS name, optionally with config and version ("cifar10:3.0.2").
        data_dir: Root TFDS data directory; defaults to ``default_data_dir()``.

    Returns:
        A ``Dataset`` with uint8 images and ``pixel_scale`` 255. Splits come from
        ``CATALOG`` when listed there, otherwise "train" and "test" (or
        "validation" when there is no "test").

    Raises:
        ValueError: If TFDS does not know ``name`` or the dataset is not image
            classification with fixed-size images.
        DatasetNotPreparedError: If the dataset has no array_record files in
            ``data_dir``; the message holds the command that prepares them.
    """
    data_dir = data_dir or default_data_dir()
    builder = _open_builder(name, data_dir)
    entry = CATALOG.get(builder.name) or CatalogEntry(test_split=_test_split(builder))
    image_shape = _image_shape(name, builder, entry)
    try:
        train, test = builder.as_data_source(split=[entry.train_split, entry.test_split])
    except (KeyError, ValueError, NotImplementedError) as err:
        if not builder.is_prepared():
            raise DatasetNotPreparedError(_not_prepared_message(name, builder, data_dir)) from None
        if isinstance(err, NotImplementedError):
            raise DatasetNotPreparedError(_wrong_format_message(name, builder, data_dir)) from None
        raise
    return Dataset(
        name=name,
        train=TfdsSource(train, image_size=entry.image_size),
        test=TfdsSource(test, image_size=entry.image_size),
        num_classes=builder.info.features["label"].num_classes,
        image_shape=image_shape,
        pixel_scale=PIXEL_SCALE,
    )
