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


def test_builds_array_record_files_under_kdq_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KDQ_DATA_DIR", str(tmp_path))
    load_dataset("digits")
    version_dir = tmp_path / "digits" / "1.0.0"
    assert (version_dir / "dataset_info.json").is_file()
    for split in ("train", "test"):
        assert list(version_dir.glob(f"digits-{split}.array_record-*"))


def test_default_data_dir_is_under_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("KDQ_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == str(tmp_path / ".cache" / "kdq" / "tensorflow_datasets")


def test_metadata_and_split_sizes(digits):
    assert digits.name == "digits"
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.num_classes == 10
    assert digits.image_shape == (8, 8, 1)
    assert digits.pixel_scale == 16
    example = digits.train[0]
    assert set(example) == {"image", "label"}
    assert example["image"].shape == (8, 8, 1)
    assert example["image"].dtype == np.uint8
    assert isinstance(example["label"], int)


def test_labels_cover_all_classes_in_both_splits(digits):
    for split in (digits.train, digits.test):
        labels = np.array([split[i]["label"] for i in range(len(split))])
        assert labels.min() == 0 and labels.max() == 9
        assert set(labels.tolist()) == set(range(10))


def test_examples_equal_sklearn_rows_of_a_stratified_80_20_split(digits):
    reference = sklearn_load_digits()
    train_rows, test_rows = train_test_split(
        np.arange(len(reference.target)),
        test_size=0.2,
        stratify=reference.target,
        random_state=0,
    )
    for split, rows in ((digits.train, train_rows), (digits.test, test_rows)):
        assert len(split) == len(rows)
        images = np.stack([split[i]["image"][..., 0] for i in range(len(split))])
        labels = np.array([split[i]["label"] for i in range(len(split))])
        np.testing.assert_array_equal(images, reference.images[rows])
        np.testing.assert_array_equal(labels, reference.target[rows])


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
    assert (len(dataset.train), len(dataset.test)) == (1437, 360)
    assert [p.name for p in (tmp_path / "digits").iterdir()] == ["1.0.0"]


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
    assert (tmp_path / "digits" / "1.0.0" / "dataset_info.json").is_file()
