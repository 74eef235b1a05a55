"""Byte-level text: next-byte windows of documents and labelled fixed-length passages.

Every token is one byte of UTF-8 text, so the vocabulary is the 256 byte values.
A document (a play, a file, a TFDS record) of ``n`` bytes ``d`` is encoded as

    s = b"\\n" + d                                  (length n + 1)

the leading newline (``START_OF_DOCUMENT``) being the context of its first byte,
so every byte of ``d`` is a prediction target and bits per byte count exactly the
document's bytes. With window length ``L`` (``seq_len``), window ``j`` of the
document is ``s[j*L : j*L + L + 1]``, for ``j = 0 .. ceil(n / L) - 1``: its inputs
are ``tokens[:-1]`` and its targets ``tokens[1:]``, so the windows predict every
byte of ``d`` exactly once and never cross a document boundary. The last window
of a document is padded with 0 and ``token_mask`` marks its real targets.

A passage is a classification example: ``length`` consecutive bytes of a
document (without the leading newline) and the document's label; a document of
``n`` bytes gives ``floor(n / length)`` non-overlapping passages, the shorter
tail being dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdq.data.core import Dataset
from kdq.data.text_features import (
    BYTE_VOCAB,
    PASSAGE_LENGTH,
    PassageFeatures,
    TokenFeatures,
    check_positive_length,
)

__all__ = [
    "BYTE_VOCAB",
    "PASSAGE_LENGTH",
    "START_OF_DOCUMENT",
    "PassageFeatures",
    "PassageSource",
    "TokenFeatures",
    "WindowSource",
    "check_documents",
    "passages",
    "windows",
    "windows_dataset",
]

START_OF_DOCUMENT = b"\n"
"""The context byte put before every document; its first byte is predicted from it."""


def check_documents(documents: Sequence[Any]) -> list[bytes]:
    """Returns the documents as a list of ``bytes``.

    Args:
        documents: Each document's UTF-8 bytes (``bytes``, ``bytearray`` or
            ``memoryview``).

    Returns:
        The documents, each as ``bytes``.

    Raises:
        ValueError: If a document is not bytes (e.g. a str, which must be encoded
            with ``.encode("utf-8")`` first).
    """
    checked = []
    for position, document in enumerate(documents):
        if not isinstance(document, (bytes, bytearray, memoryview)):
            raise ValueError(
                f"document {position} is a {type(document).__name__}, not bytes; pass "
                "each document's UTF-8 bytes (text.encode('utf-8'))"
            )
        checked.append(bytes(document))
    return checked


def _normalize_index(index: int, size: int) -> int:
    """``index`` in [0, size), counting from the end when negative, else an IndexError."""
    position = int(index)
    if position < 0:
        position += size
    if not 0 <= position < size:
        raise IndexError(f"index {index} is out of range for {size} examples")
    return position


class WindowSource:
    """Random-access next-byte windows of documents (module docstring).

    Attributes:
        seq_len: Targets per window.
        num_classes: ``BYTE_VOCAB``, the bound the pipelines check tokens against.
        num_targets: Real targets over all windows: the total bytes of the documents.
        split: Name of the split, for error messages.
    """

    def __init__(self, documents: Sequence[bytes], seq_len: int, *, split: str = "windows"):
        self.seq_len = check_positive_length(seq_len, "seq_len")
        encoded = [START_OF_DOCUMENT + document for document in check_documents(documents)]
        self._bytes = np.frombuffer(b"".join(encoded), np.uint8)
        lengths = np.array([len(document) for document in encoded], np.int64)
        self._ends = np.cumsum(lengths)
        self._starts = self._ends - lengths
        windows_per_document = -(-(lengths - 1) // self.seq_len)
        self._first_window = np.concatenate([[0], np.cumsum(windows_per_document)])
        self.num_classes = BYTE_VOCAB
        self.num_targets = int(np.sum(lengths - 1))
        self.split = split

    def __len__(self) -> int:
        return int(self._first_window[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        position = _normalize_index(index, len(self))
        document = int(np.searchsorted(self._first_window, position, side="right")) - 1
        begin = (
            int(self._starts[document])
            + (position - int(self._first_window[document])) * self.seq_len
        )
        end = min(begin + self.seq_len + 1, int(self._ends[document]))
        tokens = np.zeros(self.seq_len + 1, np.int32)
        tokens[: end - begin] = self._bytes[begin:end]
        return {"tokens": tokens, "token_mask": np.arange(self.seq_len) < end - begin - 1}


def windows(documents: Sequence[bytes], seq_len: int, *, split: str = "windows") -> WindowSource:
    """The next-byte windows of ``documents`` as a random-access source.

    Args:
        documents: Each document's UTF-8 bytes, without the start-of-document
            newline (the windows add it).
        seq_len: Targets per window, ``L`` of the module docstring.
        split: Name of the split, for error messages.

    Returns:
        A ``WindowSource`` of ``sum(ceil(n_d / seq_len))`` windows, document by
        document in order; element ``i`` is ``{"tokens", "token_mask"}``.

    Raises:
        ValueError: If seq_len is not a positive integer or a document is not bytes.
    """
    return WindowSource(documents, seq_len, split=split)


class PassageSource:
    """Random-access labelled passages of documents (module docstring).

    Attributes:
        length: Bytes per passage.
        num_classes: The labels' exclusive upper bound, or None when unknown.
        split: Name of the split, for error messages.
    """

    def __init__(
        self,
        documents: Sequence[bytes],
        labels: Sequence[int],
        length: int = PASSAGE_LENGTH,
        *,
        num_classes: int | None = None,
        split: str = "passages",
    ):
        documents = check_documents(documents)
        if len(documents) != len(labels):
            raise ValueError(f"{len(documents)} documents but {len(labels)} labels")
        self.length = check_positive_length(length, "length")
        self._bytes = np.frombuffer(b"".join(documents), np.uint8)
        lengths = np.array([len(document) for document in documents], np.int64)
        self._starts = np.cumsum(lengths) - lengths
        self._first_passage = np.concatenate([[0], np.cumsum(lengths // self.length)])
        self._labels = [int(label) for label in labels]
        self.num_classes = num_classes
        self.split = split

    def __len__(self) -> int:
        return int(self._first_passage[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = _normalize_index(index, len(self))
        document = int(np.searchsorted(self._first_passage, position, side="right")) - 1
        offset = (position - int(self._first_passage[document])) * self.length
        begin = int(self._starts[document]) + offset
        tokens = self._bytes[begin : begin + self.length].astype(np.int32)
        return {"tokens": tokens, "label": self._labels[document]}


def passages(
    documents: Sequence[bytes],
    labels: Sequence[int],
    length: int = PASSAGE_LENGTH,
    *,
    num_classes: int | None = None,
    split: str = "passages",
) -> PassageSource:
    """The labelled passages of ``documents`` as a random-access source.

    Args:
        documents: Each document's UTF-8 bytes.
        labels: Each document's class index, given to all of its passages.
        length: Bytes per passage.
        num_classes: The labels' exclusive upper bound, kept as ``num_classes``
            for the pipelines; None when unknown.
        split: Name of the split, for error messages.

    Returns:
        A ``PassageSource`` of ``sum(floor(n_d / length))`` passages, document by
        document in order; element ``i`` is ``{"tokens": int32 (length,), "label"}``.

    Raises:
        ValueError: If length is not a positive integer, a document is not bytes
            or documents and labels differ in number.
    """
    return PassageSource(documents, labels, length, num_classes=num_classes, split=split)


def windows_dataset(name: str, splits: Mapping[str, Sequence[bytes]], seq_len: int) -> Dataset:
    """A next-byte prediction ``Dataset`` of the documents of each split.

    Args:
        name: Dataset name; a split's error messages call it "<name> <split>".
        splits: "train", "validation" and "test", each to its documents' bytes.
        seq_len: Targets per window.

    Returns:
        The ``Dataset`` of ``WindowSource`` splits with ``TokenFeatures(seq_len)``
        and ``num_classes`` ``BYTE_VOCAB``.

    Raises:
        ValueError: If seq_len is not a positive integer or a split has no bytes.
    """
    features = TokenFeatures(seq_len)
    sources = {
        role: windows(documents, features.seq_len, split=f"{name} {role}")
        for role, documents in splits.items()
    }
    for role, source in sources.items():
        if not len(source):
            raise ValueError(
                f"the {role} split of dataset {name!r} has no text ({len(splits[role])} "
                "empty documents); every split needs at least one byte"
            )
    return Dataset(name=name, features=features, num_classes=BYTE_VOCAB, **sources)
