import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits as sklearn_load_digits
from sklearn.model_selection import train_test_split

from kdq.data import default_data_dir, load_dataset
from kdq.data import digits as digits_module


def _tree(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def _arrays(split) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([split[i]["image"] for i in range(len(split))])
    labels = np.array([split[i]["label"] for i in range(len(split))])
    return images, labels


def _content_hash(split) -> str:
    images, labels = _arrays(split)
    digest = hashlib.sha256(images.astype(np.uint8).tobytes())
    digest.update(labels.astype("<i8").tobytes())
    return digest.hexdigest()


def _reference_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The documented splits, computed here from sklearn alone."""
    target = sklearn_load_digits().target
    rest, test_rows = train_test_split(
        np.arange(len(target)), test_size=0.2, stratify=target, random_state=0
    )
    train_rows, validation_rows = train_test_split(
        rest, test_size=0.2, stratify=target[rest], random_state=0
    )
    return train_rows, validation_rows, test_rows


def test_builds_array_record_files_under_kdq_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KDQ_DATA_DIR", str(tmp_path))
    load_dataset("digits")
    version_dir = tmp_path / "digits" / "2.0.0"
    assert (version_dir / "dataset_info.json").is_file()
    for split in ("train", "validation", "test"):
        assert list(version_dir.glob(f"digits-{split}.array_record-*"))


def test_default_data_dir_is_under_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("KDQ_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == str(tmp_path / ".cache" / "kdq" / "tensorflow_datasets")


def test_metadata_and_split_sizes(digits):
    assert digits.name == "digits"
    assert (len(digits.train), len(digits.validation), len(digits.test)) == (1149, 288, 360)
    assert digits.num_classes == 10
    assert digits.features.shape == (8, 8, 1)
    assert digits.features.pixel_scale == 16
    example = digits.train[0]
    assert set(example) == {"image", "label"}
    assert example["image"].shape == (8, 8, 1)
    assert example["image"].dtype == np.uint8
    assert isinstance(example["label"], int)


def test_per_class_counts_are_the_documented_stratified_ones(digits):
    counts = {
        name: np.bincount(_arrays(split)[1], minlength=10).tolist()
        for name, split in (
            ("train", digits.train),
            ("validation", digits.validation),
            ("test", digits.test),
        )
    }
    assert counts == {
        "train": [113, 117, 114, 117, 116, 116, 116, 114, 111, 115],
        "validation": [29, 29, 28, 29, 29, 29, 29, 29, 28, 29],
        "test": [36, 36, 35, 37, 36, 37, 36, 36, 35, 36],
    }
    # Stratified: every class holds out within one example of its 20 % share.
    per_class = np.bincount(sklearn_load_digits().target)
    test = np.array(counts["test"])
    validation = np.array(counts["validation"])
    assert np.all(np.abs(test - 0.2 * per_class) < 1)
    assert np.all(np.abs(validation - 0.2 * (per_class - test)) < 1)


def test_examples_equal_sklearn_rows_of_the_documented_splits(digits):
    reference = sklearn_load_digits()
    splits = (digits.train, digits.validation, digits.test)
    for split, rows in zip(splits, _reference_rows(), strict=True):
        images, labels = _arrays(split)
        np.testing.assert_array_equal(images[..., 0], reference.images[rows])
        np.testing.assert_array_equal(labels, reference.target[rows])


def test_the_three_splits_are_disjoint_and_cover_every_image():
    train_rows, validation_rows, test_rows = digits_module.split_indices(
        sklearn_load_digits().target
    )
    rows = np.concatenate([train_rows, validation_rows, test_rows])
    assert len(rows) == 1797
    np.testing.assert_array_equal(np.sort(rows), np.arange(1797))


def test_split_content_is_fixed_and_test_equals_version_1_0_0(digits):
    # Hashes of the stored images and labels; the test hash was taken from the
    # 1.0.0 build, whose train split held the 1437 train and validation examples.
    assert _content_hash(digits.train) == (
        "e6625b093299775b1d2e06d4a94a3b5f8c015d831f6af7c4710447909de069ef"
    )
    assert _content_hash(digits.validation) == (
        "0ad0f00511d58e270c7e18429880e240f063a1cd328f6bdafddd99f7e985ad44"
    )
    assert _content_hash(digits.test) == (
        "3ea49a6c5c1f0810a1e9f1178f9d79a4469c14576fbaaec2880a46a2f2a8928b"
    )


class _DigitsVersion1(digits_module.DigitsBuilder, skip_registration=True):
    """The 1.0.0 builder: train and test only."""

    name = "digits"
    VERSION = digits_module.tfds.core.Version("1.0.0")

    def _split_generators(self, dl_manager):
        target = sklearn_load_digits().target
        images = sklearn_load_digits().images.astype(np.uint8)[..., None]
        rest, test_rows = train_test_split(
            np.arange(len(target)), test_size=0.2, stratify=target, random_state=0
        )
        return {
            "train": self._generate_examples(images, target, rest),
            "test": self._generate_examples(images, target, test_rows),
        }


def test_a_version_1_cache_is_not_read_as_the_current_version(tmp_path):
    _DigitsVersion1(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    dataset = load_dataset("digits", data_dir=str(tmp_path))
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (1149, 288, 360)
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["1.0.0", "2.0.0"]


def test_second_load_reuses_files_without_regenerating(tmp_path, monkeypatch):
    first = load_dataset("digits", data_dir=str(tmp_path))
    before = _tree(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("the cached dataset was regenerated")

    monkeypatch.setattr(digits_module.DigitsBuilder, "_generate_examples", fail)
    second = load_dataset("digits", data_dir=str(tmp_path))
    assert _tree(tmp_path) == before
    np.testing.assert_array_equal(second.test[17]["image"], first.test[17]["image"])


def test_concurrent_build_that_finishes_first_is_reused(tmp_path, monkeypatch):
    # While this build is writing, another build of the same dir completes, so
    # this build's final rename finds the directory already in place.
    data_dir = str(tmp_path)
    original = digits_module.DigitsBuilder._generate_examples
    raced = []

    def racing(self, images, labels, rows):
        if not raced:
            raced.append(True)
            digits_module.prepare_digits(data_dir)
        yield from original(self, images, labels, rows)

    monkeypatch.setattr(digits_module.DigitsBuilder, "_generate_examples", racing)
    dataset = load_dataset("digits", data_dir=data_dir)
    assert raced
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (1149, 288, 360)
    assert [p.name for p in (tmp_path / "digits").iterdir()] == ["2.0.0"]


def test_builds_loads_and_batches_without_importing_tensorflow(tmp_path):
    # A fresh interpreter, so no other test can have imported anything first.
    script = textwrap.dedent(
        """
        import sys

        from kdq.data import eval_batches, load_dataset, train_batches

        dataset = load_dataset("digits", data_dir=sys.argv[1])
        batch = next(train_batches(dataset, batch_size=32, seed=0))
        assert batch["image"].shape == (32, 8, 8, 1), batch["image"].shape
        seen = sum(int(b["mask"].sum()) for b in eval_batches(dataset, batch_size=100))
        assert seen == 360, seen
        batches = eval_batches(dataset, batch_size=100, split="validation")
        seen = sum(int(b["mask"].sum()) for b in batches)
        assert seen == 288, seen
        loaded = [name for name in sys.modules if name.split(".")[0] == "tensorflow"]
        assert not loaded, loaded
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "digits" / "2.0.0" / "dataset_info.json").is_file()
