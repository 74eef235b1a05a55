"""Byte-level text: features, windows and passages against slicing by hand, text:<dir>, tfds_text."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdq.data import (
    DatasetNotPreparedError,
    PassageFeatures,
    TokenFeatures,
    eval_batches,
    load_dataset,
    passages,
    train_batches,
    windows,
)
from kdq.data.text import windows_dataset

DOCUMENTS = [b"abcdefghij", b"", b"xyz", "caf\u00e9 \u2603".encode(), b"0123456789abcdef"]


def reference_windows(documents, seq_len):
    """Windows straight from the contract: s = b"\\n" + d, window j = s[jL : jL + L + 1]."""
    tokens, masks = [], []
    for document in documents:
        encoded = b"\n" + document
        for j in range(-(-len(document) // seq_len)):
            chunk = list(encoded[j * seq_len : j * seq_len + seq_len + 1])
            tokens.append(chunk + [0] * (seq_len + 1 - len(chunk)))
            masks.append([t < len(chunk) - 1 for t in range(seq_len)])
    return np.array(tokens), np.array(masks)


def stacked(source):
    examples = [source[i] for i in range(len(source))]
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def targets(batches):
    """The real target bytes of batches, in order: tokens[:, 1:] where token_mask and mask."""
    out = bytearray()
    for batch in batches:
        real = batch["token_mask"] & batch["mask"][:, None]
        out += batch["tokens"][:, 1:][real].astype(np.uint8).tobytes()
    return bytes(out)


@pytest.fixture
def no_download(monkeypatch):
    """Fails the test if anything tries to prepare or download a dataset."""

    def fail(*args, **kwargs):
        raise AssertionError("attempted to download or prepare a dataset")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", fail)


# Features.


def test_token_features_spec_prepare_and_padding():
    features = TokenFeatures(4)
    assert features.element_spec() == {
        "tokens": jax.ShapeDtypeStruct((5,), jnp.int32),
        "token_mask": jax.ShapeDtypeStruct((4,), jnp.bool_),
    }
    example = {"tokens": np.arange(5, dtype=np.uint8), "token_mask": np.ones(4, bool)}
    prepared = features.prepare(example)
    assert prepared["tokens"].dtype == np.int32 and prepared["tokens"].tolist() == [0, 1, 2, 3, 4]
    padding = features.prepare(features.padding(example))
    assert padding["tokens"].tolist() == [0] * 5 and padding["token_mask"].tolist() == [False] * 4
    assert padding["token_mask"].dtype == np.bool_


def test_token_features_check_names_split_index_and_problem():
    features = TokenFeatures(3)
    good = {"tokens": np.array([10, 0, 255, 7]), "token_mask": np.ones(3, bool)}
    features.check(good, split="s", index=0, num_classes=256)
    bad_value = {**good, "tokens": np.array([10, 256, 0, 0])}
    with pytest.raises(
        ValueError, match=r"s example 2 has tokens in \[0, 256\], outside \[0, 256\)"
    ):
        features.check(bad_value, split="s", index=2, num_classes=256)
    with pytest.raises(ValueError, match="outside"):
        features.check(
            {**good, "tokens": np.array([1, -1, 0, 0])}, split="s", index=0, num_classes=None
        )
    with pytest.raises(ValueError, match=r"s example 5 has tokens of shape \(3,\).*shape \(4,\)"):
        features.check({**good, "tokens": np.zeros(3, int)}, split="s", index=5, num_classes=256)
    with pytest.raises(ValueError, match="dtype float32; expected integer"):
        features.check(
            {**good, "tokens": np.zeros(4, np.float32)}, split="s", index=1, num_classes=256
        )
    with pytest.raises(ValueError, match=r"token_mask of shape \(3,\) and dtype int64"):
        features.check(
            {**good, "token_mask": np.ones(3, np.int64)}, split="s", index=1, num_classes=256
        )


@pytest.mark.parametrize("seq_len", [0, -2, 2.0, True, None])
def test_token_features_need_a_positive_integer_length(seq_len):
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        TokenFeatures(seq_len)


def test_passage_features_check_tokens_against_the_bytes_and_labels_against_classes():
    features = PassageFeatures(3)
    assert features.element_spec()["tokens"] == jax.ShapeDtypeStruct((3,), jnp.int32)
    good = {"tokens": np.array([0, 97, 255]), "label": 5}
    features.check(good, split="g", index=0, num_classes=6)
    with pytest.raises(ValueError, match=r"g example 1 has tokens in \[0, 256\]"):
        features.check({**good, "tokens": np.array([0, 256, 1])}, split="g", index=1, num_classes=6)
    with pytest.raises(ValueError, match=r"g example 2 has label 6, outside \[0, 6\)"):
        features.check({**good, "label": 6}, split="g", index=2, num_classes=6)
    padding = features.prepare(features.padding(good))
    assert padding["tokens"].tolist() == [0, 0, 0] and padding["label"] == 0


# Windows and passages.


@pytest.mark.parametrize("seq_len", [1, 3, 4, 16, 40])
def test_windows_are_the_contracts_slices_of_each_document(seq_len):
    source = windows(DOCUMENTS, seq_len)
    expected_tokens, expected_masks = reference_windows(DOCUMENTS, seq_len)
    assert len(source) == len(expected_tokens)
    got = stacked(source)
    np.testing.assert_array_equal(got["tokens"], expected_tokens)
    np.testing.assert_array_equal(got["token_mask"], expected_masks)
    assert got["tokens"].dtype == np.int32 and got["token_mask"].dtype == np.bool_
    assert source.num_targets == sum(map(len, DOCUMENTS)) == got["token_mask"].sum()
    np.testing.assert_array_equal(source[-1]["tokens"], expected_tokens[-1])
    with pytest.raises(IndexError):
        source[len(source)]


def test_windows_reject_text_that_is_not_bytes_and_bad_lengths():
    with pytest.raises(ValueError, match=r"document 1 is a str, not bytes.*encode\('utf-8'\)"):
        windows([b"ok", "text"], 4)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        windows([b"ok"], 0)


def test_passages_are_consecutive_chunks_labelled_by_document():
    source = passages([b"abcdefg", b"xy", b"0123456789"], [2, 0, 1], 3, num_classes=3)
    expected = [(b"abc", 2), (b"def", 2), (b"012", 1), (b"345", 1), (b"678", 1)]
    got = [
        (bytes(source[i]["tokens"].astype(np.uint8)), source[i]["label"])
        for i in range(len(source))
    ]
    assert got == expected
    assert source[0]["tokens"].dtype == np.int32 and source.num_classes == 3
    with pytest.raises(ValueError, match="3 documents but 2 labels"):
        passages([b"a", b"b", b"c"], [0, 1])


def test_eval_batches_predict_every_byte_exactly_once():
    dataset = windows_dataset(
        "t", {"train": DOCUMENTS, "validation": DOCUMENTS, "test": DOCUMENTS}, 3
    )
    batches = list(eval_batches(dataset, batch_size=4, num_threads=0))
    assert targets(batches) == b"".join(DOCUMENTS)
    first_inputs = np.concatenate([b["tokens"][:, 0] for b in batches])
    # Documents of 10, 0, 3, 9 and 16 bytes: windows 0, 4, 5 and 8 start them, each
    # at its own b"\n" and not at the previous document's bytes.
    assert first_inputs[[0, 4, 5, 8]].tolist() == [10] * 4
    assert first_inputs[[3, 7]].tolist() == [ord("i"), ord(" ")]


def test_train_batches_over_windows_are_seeded_and_resumable():
    dataset = windows_dataset(
        "t", {"train": DOCUMENTS, "validation": DOCUMENTS, "test": DOCUMENTS}, 2
    )
    expected, _ = reference_windows(DOCUMENTS, 2)
    n, batch_size = len(expected), 4
    per_epoch = n // batch_size * batch_size
    stream = train_batches(dataset, batch_size=batch_size, seed=7, num_threads=0)
    batches = [next(stream) for _ in range(6)]
    for step, batch in enumerate(batches):
        positions = range(step * batch_size, (step + 1) * batch_size)
        rows = [
            np.random.default_rng([7, p // per_epoch]).permutation(n)[p % per_epoch]
            for p in positions
        ]
        np.testing.assert_array_equal(batch["tokens"], expected[rows])
    resumed = train_batches(dataset, batch_size=batch_size, seed=7, start_step=4, num_threads=0)
    np.testing.assert_array_equal(next(resumed)["tokens"], batches[4]["tokens"])
    other = next(train_batches(dataset, batch_size=batch_size, seed=8, num_threads=0))
    assert not np.array_equal(other["tokens"], batches[0]["tokens"])


# load_dataset("text:<directory>").


def reference_role(relative_path):
    fraction = int(hashlib.sha1(relative_path.encode()).hexdigest()[:16], 16) / 2**64
    return "train" if fraction < 0.8 else "validation" if fraction < 0.9 else "test"


def write_files(root, names):
    contents = {}
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        contents[name] = f"file {i}: {name} \u00e6\n".encode() * (i % 3 + 1)
        path.write_bytes(contents[name])
    return contents


def split_bytes(dataset, role):
    return targets(eval_batches(dataset, batch_size=8, split=role, num_threads=0))


def test_text_directory_is_split_by_file_on_the_path_hash(tmp_path):
    names = [f"part{i % 3}/doc{i:02d}.txt" for i in range(40)]
    contents = write_files(tmp_path, names)
    dataset = load_dataset(f"text:{tmp_path}", seq_len=8)
    assert dataset.name == f"text:{tmp_path}" and dataset.num_classes == 256
    assert dataset.features == TokenFeatures(8)
    by_role = {
        role: [n for n in sorted(names) if reference_role(n) == role]
        for role in ("train", "validation", "test")
    }
    assert all(by_role.values())  # These names need no reassignment.
    for role, files in by_role.items():
        assert split_bytes(dataset, role) == b"".join(contents[n] for n in files)
    again = load_dataset(f"text:{tmp_path}", seq_len=8)
    np.testing.assert_array_equal(stacked(again.test)["tokens"], stacked(dataset.test)["tokens"])


def test_three_files_fill_every_split_by_the_closest_hash(tmp_path):
    names = ["b.txt", "d.txt", "e.txt"]
    # u = 0.675, 0.593, 0.042: all train. Test takes the one closest to [0.9, 1), b;
    # validation then takes the train file closest to [0.8, 0.9), d.
    assert [reference_role(n) for n in names] == ["train"] * 3
    contents = write_files(tmp_path, names)
    dataset = load_dataset(f"text:{tmp_path}", seq_len=4)
    assert split_bytes(dataset, "train") == contents["e.txt"]
    assert split_bytes(dataset, "validation") == contents["d.txt"]
    assert split_bytes(dataset, "test") == contents["b.txt"]


def test_text_directory_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="holds no files"):
        load_dataset(f"text:{tmp_path}", seq_len=4)
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(f"text:{tmp_path / 'missing'}", seq_len=4)
    write_files(tmp_path, ["a.txt", "b.txt"])
    with pytest.raises(ValueError, match="2 files cannot be split.*at least 3"):
        load_dataset(f"text:{tmp_path}", seq_len=4)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "latin1.txt").write_bytes(b"ok caf\xe9")
    with pytest.raises(ValueError, match=r"sub/latin1\.txt is not UTF-8 text: byte 6 \(0xe9\)"):
        load_dataset(f"text:{tmp_path}", seq_len=4)


def test_language_model_names_need_a_positive_seq_len_and_no_image_size(tmp_path):
    write_files(tmp_path, ["a", "b", "c"])
    with pytest.raises(ValueError, match="needs their length: pass seq_len="):
        load_dataset(f"text:{tmp_path}")
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        load_dataset(f"text:{tmp_path}", seq_len=0)
    with pytest.raises(ValueError, match="is a text dataset; pass image_size=None"):
        load_dataset(f"text:{tmp_path}", seq_len=4, image_size=8)


# load_dataset("tfds_text:...").


def test_mocked_tiny_shakespeare_gives_the_windows_of_its_records(tmp_path, no_download):
    with tfds.testing.mock_data(num_examples=3):
        dataset = load_dataset("tfds_text:tiny_shakespeare", data_dir=str(tmp_path), seq_len=5)
        records = tfds.data_source("tiny_shakespeare", split="test", data_dir=str(tmp_path))
        texts = [records[i]["text"].encode() for i in range(len(records))]
    assert dataset.name == "tfds_text:tiny_shakespeare" and dataset.num_classes == 256
    expected, masks = reference_windows(texts, 5)
    np.testing.assert_array_equal(stacked(dataset.test)["tokens"], expected)
    np.testing.assert_array_equal(stacked(dataset.test)["token_mask"], masks)


class KdqTinyTexts(tfds.core.GeneratorBasedBuilder):
    """A registered TFDS text dataset with train and test splits, and a second text feature."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"text": tfds.features.Text(), "title": tfds.features.Text()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples("train", 10),
            "test": self._generate_examples("test", 2),
        }

    def _generate_examples(self, split, n):
        for i in range(n):
            yield i, {"text": f"{split} record {i} \u00fc", "title": f"T{i}"}


@pytest.fixture
def tiny_texts_dir(tmp_path):
    """A data dir where the tiny text dataset is prepared as array_record files."""
    KdqTinyTexts(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    return tmp_path


def stored_texts(data_dir, split, feature="text"):
    """A split's texts in TFDS's stored (shuffled) order, read straight from TFDS."""
    records = tfds.data_source("kdq_tiny_texts", split=split, data_dir=str(data_dir))
    return [records[i][feature] for i in range(len(records))]


def test_prepared_tfds_text_holds_out_the_last_tenth_of_train(tiny_texts_dir, no_download):
    train, test = stored_texts(tiny_texts_dir, "train"), stored_texts(tiny_texts_dir, "test")
    assert sorted(test) == ["test record 0 \u00fc".encode(), "test record 1 \u00fc".encode()]
    data_dir = str(tiny_texts_dir)
    dataset = load_dataset("tfds_text:kdq_tiny_texts", data_dir=data_dir, seq_len=6)
    assert split_bytes(dataset, "train") == b"".join(train[:9])
    assert split_bytes(dataset, "validation") == train[9]
    assert split_bytes(dataset, "test") == b"".join(test)
    titles = load_dataset("tfds_text:kdq_tiny_texts:title", data_dir=data_dir, seq_len=6)
    assert split_bytes(titles, "test") == b"".join(stored_texts(tiny_texts_dir, "test", "title"))
    with pytest.raises(
        ValueError, match="no text feature 'body'; its text features are text, title"
    ):
        load_dataset("tfds_text:kdq_tiny_texts:body", data_dir=data_dir, seq_len=6)


def test_unprepared_tfds_text_names_the_prepare_command(tmp_path, no_download):
    with pytest.raises(DatasetNotPreparedError, match="tfds build tiny_shakespeare") as info:
        load_dataset("tfds_text:tiny_shakespeare", data_dir=str(tmp_path), seq_len=8)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_text_set'"):
        load_dataset("tfds_text:no_such_text_set", data_dir=str(tmp_path), seq_len=8)
