"""TFDS catalog datasets (mnist, cifar10, imagenet2012, ...) read without TensorFlow.

Reading goes through TFDS's random-access data sources over array_record files
and never downloads anything. Preparing a catalog dataset is a separate,
one-off step: TFDS's generation code and its ``tfds`` command line need
TensorFlow, so it runs in any environment that has it and writes array_record
files that this module then reads.

Validation: a dataset's own "validation" split when TFDS has one and it is not
the split used for testing; otherwise the last ``VALIDATION_PERCENT`` percent of
the train split in its stored order (TFDS split slicing: ``train[:90%]`` trains,
``train[90%:]`` validates; TFDS rounds the boundary to the closest example, so
the two are disjoint and together hold the whole train split). TFDS stores a
train split in a fixed, shuffled order, so the slice is the same on every
preparation. Every CATALOG dataset, imagenet2012 included (its "validation" is
its test split here), validates on such a slice.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

import tensorflow_datasets as tfds

from kdq.data.augment import Augment
from kdq.data.core import Dataset, default_data_dir
from kdq.data.features import ImageFeatures
from kdq.data.geometry import EVAL_CROP_FRACTION
from kdq.data.sources import tfds_dataset

PIXEL_SCALE = 255.0
VALIDATION_PERCENT = 10
"""Percentage of the train split held out for validation when TFDS has no separate one."""


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """How kdq reads one TFDS dataset, and its standard preprocessing.

    Attributes:
        train_split: TFDS split used for training.
        test_split: TFDS split used for evaluation.
        validation_split: TFDS split used for validation, distinct from
            ``test_split``; None holds out the last ``VALIDATION_PERCENT`` percent
            of ``train_split`` instead.
        image_size: Side of the square that images are resized and centre-cropped
            to when ``load_dataset`` gets no ``image_size``; None keeps the stored
            size, which must then be fixed.
        crop_fraction: Fraction of the resized shorter side that the square keeps
            (``resize_and_center_crop``).
        mean: Per-channel mean of the images scaled to [0, 1]; None for none.
        std: Per-channel standard deviation of the images scaled to [0, 1].
        augment: Standard training augmentation (``default_augment``).
    """

    train_split: str = "train"
    test_split: str = "test"
    validation_split: str | None = None
    image_size: int | None = None
    crop_fraction: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: Augment = Augment()


CATALOG: dict[str, CatalogEntry] = {
    "mnist": CatalogEntry(mean=(0.1307,), std=(0.3081,)),
    "fashion_mnist": CatalogEntry(mean=(0.2860,), std=(0.3530,)),
    "cifar10": CatalogEntry(
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        augment=Augment(crop_padding=4, horizontal_flip=True),
    ),
    "cifar100": CatalogEntry(
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augment=Augment(crop_padding=4, horizontal_flip=True),
    ),
    "imagenet2012": CatalogEntry(
        test_split="validation",
        image_size=224,
        crop_fraction=EVAL_CROP_FRACTION,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        augment=Augment(horizontal_flip=True, inception_crop=True),
    ),
}

KNOWN_DATASETS: tuple[str, ...] = ("digits", *CATALOG)
"""Names ``load_dataset`` documents; "digits" is embedded (``kdq.data.digits``)."""


def default_augment(name: str) -> Augment:
    """Returns a dataset's standard training augmentation.

    Args:
        name: Dataset name as ``load_dataset`` takes it, optionally with a TFDS
            config or version ("cifar10:3.0.2").

    Returns:
        cifar10 and cifar100: 4-pixel zero-padded random crop and horizontal
        flip; imagenet2012: Inception crop and horizontal flip; mnist,
        fashion_mnist, digits and datasets outside ``CATALOG``: none.
    """
    base_name = name.split(":")[0].split("/")[0]
    return CATALOG.get(base_name, CatalogEntry()).augment


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


def open_data_sources(
    name: str, builder: tfds.core.DatasetBuilder, data_dir: str, splits: list[str]
) -> list[Any]:
    """`builder.as_data_source(split=splits)`, or an error saying how to prepare the data.

    Raises:
        DatasetNotPreparedError: The dataset is not prepared in ``data_dir``, or
            not as array_record (no random access); the message holds the
            command that prepares it.
    """
    try:
        return builder.as_data_source(split=splits)
    except (KeyError, ValueError, NotImplementedError) as err:
        if not builder.is_prepared():
            raise DatasetNotPreparedError(_not_prepared_message(name, builder, data_dir)) from None
        if isinstance(err, NotImplementedError):
            raise DatasetNotPreparedError(_wrong_format_message(name, builder, data_dir)) from None
        raise


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


def _validation_split(builder: tfds.core.DatasetBuilder, test_split: str) -> str | None:
    if "validation" in builder.info.splits and test_split != "validation":
        return "validation"
    return None


def _split_specs(entry: CatalogEntry) -> dict[str, str]:
    """TFDS split specs of the train, validation and test splits, in that order."""
    if entry.validation_split is not None:
        train, validation = entry.train_split, entry.validation_split
    else:
        keep = 100 - VALIDATION_PERCENT
        train = f"{entry.train_split}[:{keep}%]"
        validation = f"{entry.train_split}[{keep}%:]"
    return {"train": train, "validation": validation, "test": entry.test_split}


def _missing_split_message(
    name: str, builder: tfds.core.DatasetBuilder, data_dir: str, specs: dict[str, str]
) -> str | None:
    available = set(builder.info.splits)
    needed = {role: spec.split("[")[0] for role, spec in specs.items()}
    missing = {role: split for role, split in needed.items() if split not in available}
    if not missing:
        return None
    wanted = ", ".join(f"{role} from {spec!r}" for role, spec in specs.items())
    return (
        f"Dataset {name!r} in data_dir {data_dir!r} has the splits "
        f"{', '.join(sorted(available))}, but kdq reads {wanted}; "
        f"{', '.join(sorted(set(missing.values())))} is not prepared. Prepare every "
        f"split (after deleting {builder.data_dir}):\n    {prepare_command(name, data_dir)}"
    )


def _image_shape(
    name: str, builder: tfds.core.DatasetBuilder, image_size: int | None
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
    if image_size is not None:
        shape = (image_size, image_size, shape[2])
    if None in shape:
        raise ValueError(
            f"Dataset {name!r} has images of varying size {shape}; pass an image_size "
            "to load_dataset"
        )
    return shape


def load_catalog_dataset(
    name: str, data_dir: str | None = None, image_size: int | None = None
) -> Dataset:
    """Opens a prepared TFDS dataset for random access; never downloads.

    Args:
        name: TFDS name, optionally with config and version ("cifar10:3.0.2").
        data_dir: Root TFDS data directory; defaults to ``default_data_dir()``.
        image_size: Side of the square images are resized and centre-cropped to;
            defaults to the ``CATALOG`` entry's (224 for imagenet2012, whose
            sources then give the standard evaluation crop and keep the stored
            images in their ``raw`` attribute), otherwise the stored size.

    Returns:
        A ``Dataset`` of uint8 images whose ``ImageFeatures`` have
        ``pixel_scale`` 255 and, for ``CATALOG`` datasets, the standard ``mean``
        and ``std``. Train and test splits come from ``CATALOG`` when listed
        there, otherwise "train" and "test" (or "validation" when there is no
        "test"); the validation split is chosen as the module docstring says,
        and train loses the examples it holds.

    Raises:
        ValueError: If TFDS does not know ``name``, the dataset is not image
            classification with fixed-size images, or its train split is too
            small to hold out a non-empty validation slice.
        DatasetNotPreparedError: If the dataset has no array_record files in
            ``data_dir``, or lacks a split kdq reads; the message holds the
            command that prepares them.
    """
    data_dir = data_dir or default_data_dir()
    builder = _open_builder(name, data_dir)
    entry = CATALOG.get(builder.name)
    if entry is None:
        test_split = _test_split(builder)
        entry = CatalogEntry(
            test_split=test_split, validation_split=_validation_split(builder, test_split)
        )
    if image_size is None:
        image_size = entry.image_size
    image_shape = _image_shape(name, builder, image_size)
    specs = _split_specs(entry)
    if builder.info.splits:  # Read from a prepared copy's dataset_info.json.
        missing = _missing_split_message(name, builder, data_dir, specs)
        if missing is not None:
            raise DatasetNotPreparedError(missing)
        if builder.info.splits[specs["validation"]].num_examples == 0:
            raise ValueError(
                f"Dataset {name!r}: the validation split {specs['validation']!r} is empty, "
                "so nothing could select a recipe or checkpoint; the training split "
                f"{specs['train']!r} has {builder.info.splits[specs['train']].num_examples} "
                "examples. Prepare a dataset with more training examples or a non-empty "
                "validation split."
            )
    records = open_data_sources(name, builder, data_dir, list(specs.values()))
    num_classes = builder.info.features["label"].num_classes
    features = ImageFeatures(image_shape, PIXEL_SCALE, entry.mean, entry.std)
    return tfds_dataset(
        name, specs, records, features, num_classes, image_size, entry.crop_fraction
    )
