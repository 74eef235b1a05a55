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

from kdq.data.augment import Augment
from kdq.data.core import Dataset, default_data_dir
from kdq.data.geometry import EVAL_CROP_FRACTION
from kdq.data.sources import TfdsSource

PIXEL_SCALE = 255.0


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """How kdq reads one TFDS dataset, and its standard preprocessing.

    Attributes:
        train_split: TFDS split used for training.
        test_split: TFDS split used for evaluation.
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
        A ``Dataset`` with uint8 images, ``pixel_scale`` 255 and, for ``CATALOG``
        datasets, the standard ``mean`` and ``std``. Splits come from ``CATALOG``
        when listed there, otherwise "train" and "test" (or "validation" when
        there is no "test").

    Raises:
        ValueError: If TFDS does not know ``name`` or the dataset is not image
            classification with fixed-size images.
        DatasetNotPreparedError: If the dataset has no array_record files in
            ``data_dir``; the message holds the command that prepares them.
    """
    data_dir = data_dir or default_data_dir()
    builder = _open_builder(name, data_dir)
    entry = CATALOG.get(builder.name) or CatalogEntry(test_split=_test_split(builder))
    if image_size is None:
        image_size = entry.image_size
    image_shape = _image_shape(name, builder, image_size)
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
        train=TfdsSource(train, image_size, entry.crop_fraction),
        test=TfdsSource(test, image_size, entry.crop_fraction),
        num_classes=builder.info.features["label"].num_classes,
        image_shape=image_shape,
        pixel_scale=PIXEL_SCALE,
        mean=entry.mean,
        std=entry.std,
    )
