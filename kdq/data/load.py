"""Single entry point that loads any dataset kdq knows by name."""

from __future__ import annotations

from kdq.data.catalog import load_catalog_dataset
from kdq.data.core import Dataset
from kdq.data.digits import load_digits
from kdq.data.shakespeare import load_shakespeare_char, load_shakespeare_genre
from kdq.data.text import check_positive_length
from kdq.data.text_dir import load_text_directory
from kdq.data.text_tfds import load_tfds_text

TEXT_DIRECTORY_PREFIX = "text:"
"""``load_dataset("text:<directory>")`` loads a directory of UTF-8 files."""
TFDS_TEXT_PREFIX = "tfds_text:"
"""``load_dataset("tfds_text:<name>[:<feature>]")`` loads a prepared TFDS text dataset."""


def is_language_model_dataset(name: str) -> bool:
    """Whether ``load_dataset(name)`` gives next-byte windows (and so needs a seq_len).

    Args:
        name: A dataset name as ``load_dataset`` takes it.

    Returns:
        True for "shakespeare_char", "text:<directory>" and "tfds_text:<name>".
    """
    return name == "shakespeare_char" or name.startswith((TEXT_DIRECTORY_PREFIX, TFDS_TEXT_PREFIX))


def _load_text(name: str, data_dir: str | None, seq_len: int | None) -> Dataset:
    """Loads ``name``, a text dataset (``is_language_model_dataset`` or "shakespeare_genre")."""
    if name == "shakespeare_genre":
        return load_shakespeare_genre(data_dir)
    if seq_len is None:
        raise ValueError(
            f"dataset {name!r} is next-byte windows and needs their length: pass seq_len= "
            "(e.g. 256) to load_dataset"
        )
    seq_len = check_positive_length(seq_len, "seq_len")
    if name == "shakespeare_char":
        return load_shakespeare_char(data_dir, seq_len)
    if name.startswith(TEXT_DIRECTORY_PREFIX):
        return load_text_directory(name.removeprefix(TEXT_DIRECTORY_PREFIX), seq_len)
    return load_tfds_text(name.removeprefix(TFDS_TEXT_PREFIX), data_dir, seq_len)


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    seq_len: int | None = None,
) -> Dataset:
    """Loads a dataset for training and evaluation.

    Args:
        name: An image classification dataset: "digits" for the embedded
            scikit-learn digits (built on first use); any name not listed here is
            a TFDS dataset (mnist, fashion_mnist, cifar10, cifar100, imagenet2012,
            ...) that must already be prepared as array_record files. Or a text
            dataset of bytes (``kdq.data.text``): "shakespeare_char" (next-byte
            windows of Shakespeare's plays, built on first use) or
            "shakespeare_genre" (their 256-byte passages labelled by genre),
            ``kdq.data.shakespeare``; "text:<directory>", next-byte windows of the
            UTF-8 files below a directory, split by file (``kdq.data.text_dir``);
            "tfds_text:<name>[:<feature>]", next-byte windows of the records of a
            prepared TFDS text dataset, e.g. "tfds_text:tiny_shakespeare"
            (``kdq.data.text_tfds``).
        data_dir: Root TFDS data directory; defaults to ``$KDQ_DATA_DIR`` or
            ``~/.cache/kdq/tensorflow_datasets``. "text:<directory>" reads its
            directory instead.
        image_size: Side of the square images the sources return. imagenet2012
            defaults to 224 and gets the standard evaluation crop (shorter side
            resized to ``round(image_size / 0.875)``, centre crop); any other
            image dataset keeps its stored size unless this is given, and is then
            resized (centre-cropped to a square first if it is not one). Text
            datasets take none.
        seq_len: Targets per window of a next-byte dataset ("shakespeare_char",
            "text:...", "tfds_text:..."), which need it; ignored by the others.

    Returns:
        The ``Dataset`` with random-access train, validation and test sources
        (digits: a stratified split, ``kdq.data.digits``; TFDS image datasets:
        their own validation split or the last 10% of train, ``kdq.data.catalog``;
        text datasets: as their modules say) and, for mnist, fashion_mnist,
        cifar10, cifar100 and imagenet2012, the standard per-channel ``mean`` and
        ``std``. Next-byte datasets have ``TokenFeatures(seq_len)`` and
        ``num_classes`` 256; "shakespeare_genre" has ``PassageFeatures(256)``
        and ``num_classes`` 6.

    Raises:
        ValueError: If the name is unknown or not an image classification or
            text dataset, image_size is not positive or is given for a text
            dataset, or a next-byte dataset gets no positive integer seq_len.
        DatasetNotPreparedError: If a TFDS dataset is not prepared in ``data_dir``.
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if is_language_model_dataset(name) or name == "shakespeare_genre":
        if image_size is not None:
            raise ValueError(
                f"image_size={image_size} resizes images, but {name!r} is a text dataset; "
                "pass image_size=None"
            )
        return _load_text(name, data_dir, seq_len)
    if name == "digits":
        return load_digits(data_dir, image_size)
    return load_catalog_dataset(name, data_dir, image_size)
