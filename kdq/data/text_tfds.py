"""A prepared TFDS text dataset as next-byte windows ("tfds_text:<name>[:<feature>]").

Each record's text feature ("text" unless named) is one document (its UTF-8
bytes; ``kdq.data.text``). The records are read once, at load time, through
TFDS's random-access data source over array_record files; nothing is downloaded
and TensorFlow is not needed. Splits: "train" trains and "test" tests; the
dataset's own "validation" split validates when it has one, otherwise the last
``VALIDATION_PERCENT`` percent of train in its stored order (``train[90%:]``,
train keeping ``train[:90%]``), as for the image catalog (``kdq.data.catalog``).
"""

from __future__ import annotations

import re

import tensorflow_datasets as tfds

from kdq.data.catalog import (
    VALIDATION_PERCENT,
    DatasetNotPreparedError,
    open_data_sources,
    prepare_command,
)
from kdq.data.core import Dataset, default_data_dir
from kdq.data.text import windows_dataset

DEFAULT_FEATURE = "text"
"""The record feature read as the document when the name gives none."""
_VERSION = re.compile(r"\d+\.\d+\.\d+")


def parse_name(spec: str) -> tuple[str, str]:
    """Splits "<name>[:<feature>]" into the TFDS name and the text feature.

    A tail that is a version number ("tiny_shakespeare:1.0.0") belongs to the TFDS
    name, so "lm1b:1.1.0:text" is lm1b at version 1.1.0 and its feature "text".

    Args:
        spec: What follows "tfds_text:" in a dataset name.

    Returns:
        (TFDS name, feature name).
    """
    name, _, tail = spec.rpartition(":")
    if not name or _VERSION.fullmatch(tail):
        return spec, DEFAULT_FEATURE
    return name, tail


def _open_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown TFDS dataset {name!r}; tfds_text:<name> takes a TFDS text dataset "
            "such as tiny_shakespeare or lm1b"
        ) from None


def _check_feature(name: str, builder: tfds.core.DatasetBuilder, feature: str) -> None:
    features = builder.info.features
    items = features.items() if isinstance(features, tfds.features.FeaturesDict) else ()
    texts = sorted(key for key, value in items if isinstance(value, tfds.features.Text))
    if feature not in texts:
        raise ValueError(
            f"TFDS dataset {name!r} has no text feature {feature!r}; its text features are "
            f"{', '.join(texts) or 'none'}; name one as tfds_text:{name}:<feature>"
        )


def split_specs(builder: tfds.core.DatasetBuilder) -> dict[str, str]:
    """TFDS split specs of the train, validation and test splits (module docstring).

    Args:
        builder: The TFDS builder of the dataset.

    Returns:
        "train", "validation" and "test", each to its TFDS split spec.
    """
    if "validation" in builder.info.splits:
        return {"train": "train", "validation": "validation", "test": "test"}
    keep = 100 - VALIDATION_PERCENT
    return {"train": f"train[:{keep}%]", "validation": f"train[{keep}%:]", "test": "test"}


def _as_bytes(text: bytes | str) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def load_tfds_text(spec: str, data_dir: str | None, seq_len: int) -> Dataset:
    """Loads a prepared TFDS text dataset as next-byte windows; never downloads.

    Args:
        spec: "<name>[:<feature>]", e.g. "tiny_shakespeare" or "lm1b:text".
        data_dir: Root TFDS data directory; defaults to ``default_data_dir()``.
        seq_len: Targets per window (``kdq.data.text``).

    Returns:
        A ``Dataset`` named "tfds_text:<spec>" with ``TokenFeatures(seq_len)``,
        ``num_classes`` 256 and the windows of every record of each split.

    Raises:
        ValueError: If TFDS does not know the name, it has no such text feature,
            a split has no text, or seq_len is not a positive integer.
        DatasetNotPreparedError: If the dataset has no array_record files (or
            lacks train or test) in ``data_dir``; the message holds the command
            that prepares them.
    """
    data_dir = data_dir or default_data_dir()
    name, feature = parse_name(spec)
    builder = _open_builder(name, data_dir)
    _check_feature(name, builder, feature)
    specs = split_specs(builder)
    missing = {"train", "test"} - set(builder.info.splits)
    if builder.info.splits and missing:  # Read from a prepared copy's dataset_info.json.
        raise DatasetNotPreparedError(
            f"Dataset {name!r} in data_dir {data_dir!r} has the splits "
            f"{', '.join(sorted(builder.info.splits))}, but kdq reads train and test; prepare "
            f"every split (after deleting {builder.data_dir}):\n    {prepare_command(name, data_dir)}"
        )
    records = open_data_sources(name, builder, data_dir, list(specs.values()))
    documents = {
        role: [_as_bytes(split[i][feature]) for i in range(len(split))]
        for role, split in zip(specs, records, strict=True)
    }
    return windows_dataset(f"tfds_text:{spec}", documents, seq_len)
