"""A directory of UTF-8 text files as a next-byte prediction dataset ("text:<directory>").

Every regular file below the directory (recursively, in sorted order of its path
relative to the directory) is one document. The split is by file and depends
only on each file's relative path ``p`` (POSIX separators, UTF-8):

    u(p) = int(sha1(p)[:8 bytes], big-endian) / 2**64          in [0, 1)
    train: u < 0.8      validation: 0.8 <= u < 0.9      test: u >= 0.9

so adding or removing files never moves another file to another split. With few
files a split can come out empty; then, for test, validation and train in that
order, each empty split takes the file closest (in ``u``) to its interval from a
split that has at least two files (ties: the smaller path), so that with three or
more files every split holds at least one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kdq.data.core import Dataset
from kdq.data.text import windows_dataset

SPLIT_INTERVALS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
"""Each split's interval of ``split_fraction``."""
MIN_FILES = 3
"""Fewest files that can fill train, validation and test."""


def split_fraction(relative_path: str) -> float:
    """``u(p)`` of the module docstring: the path's SHA-1 as a fraction in [0, 1).

    Args:
        relative_path: A file's path relative to the directory, POSIX style.

    Returns:
        The first 8 bytes of the SHA-1 of its UTF-8 encoding, big-endian, over 2**64.
    """
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _distance(fraction: float, interval: tuple[float, float]) -> float:
    """How far ``fraction`` lies outside ``interval`` (0 inside it)."""
    low, high = interval
    return max(low - fraction, fraction - high, 0.0)


def assign_splits(relative_paths: list[str]) -> dict[str, list[str]]:
    """Splits files by the hash of their relative path, as the module docstring says.

    Args:
        relative_paths: The files' paths relative to the directory, POSIX style.

    Returns:
        "train", "validation" and "test", each to its sorted paths.

    Raises:
        ValueError: If there are fewer than ``MIN_FILES`` paths.
    """
    if len(relative_paths) < MIN_FILES:
        raise ValueError(
            f"{len(relative_paths)} files cannot be split by file into train, validation "
            f"and test; put at least {MIN_FILES} text files in the directory"
        )
    fractions = {path: split_fraction(path) for path in relative_paths}
    splits: dict[str, list[str]] = {role: [] for role in SPLIT_INTERVALS}
    for path, fraction in fractions.items():
        role = next(r for r, (low, high) in SPLIT_INTERVALS.items() if low <= fraction < high)
        splits[role].append(path)
    for role in ("test", "validation", "train"):
        if not splits[role]:
            donors = [path for paths in splits.values() if len(paths) > 1 for path in paths]
            path = min(donors, key=lambda p: (_distance(fractions[p], SPLIT_INTERVALS[role]), p))
            next(paths for paths in splits.values() if path in paths).remove(path)
            splits[role].append(path)
    return {role: sorted(paths) for role, paths in splits.items()}


def read_utf8(path: Path) -> bytes:
    """Returns a file's bytes after checking that they are UTF-8.

    Args:
        path: The file to read.

    Returns:
        Its content.

    Raises:
        ValueError: Naming the file and the offset of its first invalid byte.
    """
    content = path.read_bytes()
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text: byte {err.start} (0x{content[err.start]:02x}) "
            f"{err.reason}; convert it to UTF-8 or move it out of the directory"
        ) from None
    return content


def list_files(directory: str) -> dict[str, Path]:
    """Every regular file below ``directory``, by sorted POSIX path relative to it.

    Args:
        directory: The directory to walk (following symbolic links).

    Returns:
        Relative POSIX path -> path of every file, in sorted order of relative path.

    Raises:
        ValueError: If the directory does not exist or holds no files.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"text directory {directory!r} does not exist or is not a directory")
    files = {}
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                files[path.relative_to(root).as_posix()] = path
    if not files:
        raise ValueError(f"text directory {directory!r} holds no files; put UTF-8 text files in it")
    return dict(sorted(files.items()))


def load_text_directory(directory: str, seq_len: int) -> Dataset:
    """Loads every file below ``directory`` as next-byte windows, split by file.

    Args:
        directory: The directory of UTF-8 text files.
        seq_len: Targets per window (``kdq.data.text``).

    Returns:
        A ``Dataset`` named "text:<directory>" with ``TokenFeatures(seq_len)``,
        ``num_classes`` 256 and the train, validation and test windows of the
        files the module docstring assigns to each split, in sorted path order.

    Raises:
        ValueError: If the directory is missing or has fewer than three files, a
            file is not UTF-8 (naming it and the byte offset), a split's files are
            all empty, or seq_len is not a positive integer.
    """
    files = list_files(directory)
    splits = assign_splits(list(files))
    documents = {role: [read_utf8(files[path]) for path in paths] for role, paths in splits.items()}
    return windows_dataset(f"text:{directory}", documents, seq_len)
