import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdq.data import (
    CatalogEntry,
    DatasetNotPreparedError,
    ImageFeatures,
    TfdsSource,
    eval_batches,
    load_dataset,
    train_batches,
)
from kdq.data import catalog as catalog_module


def tiny_image(split: str, i: int) -> np.ndarray:
    offset = 7 * i + {"train": 0, "validation": 3, "test": 5}[split]
    return ((np.arange(60).reshape(4, 5, 3) * 4 + offset) % 256).astype(np.uint8)


def stored(source) -> list[tuple[int, bytes]]:
    return sorted((source[i]["label"], source[i]["image"].tobytes()) for i in range(len(source)))


def written(split: str, n: int) -> list[tuple[int, bytes]]:
    return sorted((i % 3, tiny_image(split, i).tobytes()) for i in range(n))


class KdqTinyImages(tfds.core.GeneratorBasedBuilder):
    """A registered TFDS dataset with train and validation splits but no test split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(4, 5, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples("train", 6),
            "validation": self._generate_examples("validation", 4),
        }

    def _generate_examples(self, split, n):
        for i in range(n):
            yield i, {"image": tiny_image(split, i), "label": i % 3}


class KdqTinyThreeSplits(KdqTinyImages):
    """A registered TFDS dataset with train, validation and test splits."""

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples("train", 10),
            "validation": self._generate_examples("validation", 4),
            "test": self._generate_examples("test", 3),
        }


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A data dir where the tiny dataset is prepared as array_record files."""
    KdqTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    return tmp_path


@pytest.fixture
def no_download(monkeypatch):
    """Fails the test if anything tries to prepare or download a dataset."""

    def fail(*args, **kwargs):
        raise AssertionError("attempted to download or prepare a dataset")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", fail)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", fail)


@pytest.mark.parametrize(
    ("name", "image_shape", "num_classes"),
    [
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
    ],
)
def test_mocked_catalog_dataset_loads(name, image_shape, num_classes, tmp_path, no_download):
    with tfds.testing.mock_data(num_examples=6):
        dataset = load_dataset(name, data_dir=str(tmp_path))
        assert dataset.name == name
        # mock_data ignores split slicing: every split holds num_examples.
        assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (6, 6, 6)
        assert dataset.features.shape == image_shape
        assert dataset.num_classes == num_classes
        assert dataset.features.pixel_scale == 255
        for i in range(6):
            example = dataset.validation[i]
            assert set(example) == {"image", "label"}
            assert example["image"].shape == image_shape
            assert example["image"].dtype == np.uint8
            assert isinstance(example["label"], int)
            assert 0 <= example["label"] < num_classes


def test_mocked_cifar10_feeds_both_pipelines(tmp_path, no_download):
    with tfds.testing.mock_data(num_examples=6):
        dataset = load_dataset("cifar10", data_dir=str(tmp_path))
        raw = np.stack([dataset.train[i]["image"] for i in range(6)])
        batch = next(train_batches(dataset, batch_size=6, seed=0))
        assert batch["image"].shape == (6, 32, 32, 3)
        assert batch["image"].dtype == np.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        # One batch is one whole epoch: the same images, reordered.
        expected = sorted(map(bytes, (raw / np.float32(255)).astype(np.float32)))
        assert sorted(map(bytes, batch["image"])) == expected
        (evaluated,) = list(eval_batches(dataset, batch_size=8))
        assert evaluated["mask"].tolist() == [True] * 6 + [False] * 2


def test_mocked_imagenet_is_resized_to_a_fixed_shape(tmp_path, no_download):
    with tfds.testing.mock_data(num_examples=2):
        dataset = load_dataset("imagenet2012", data_dir=str(tmp_path))
        assert dataset.features.shape == (224, 224, 3)
        assert dataset.num_classes == 1000
        assert dataset.test[1]["image"].shape == (224, 224, 3)


def test_prepared_tfds_dataset_is_read_from_array_record_files(tiny_data_dir, no_download):
    # Its "validation" split is the test split here, so validation is the last
    # 10 % of train: round(0.9 * 6) = 5 examples train, 1 validates.
    dataset = load_dataset("kdq_tiny_images", data_dir=str(tiny_data_dir))
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (5, 1, 4)
    features = dataset.features
    assert (features.shape, dataset.num_classes, features.pixel_scale) == ((4, 5, 3), 3, 255)
    assert stored(dataset.test) == written("validation", 4)
    train, validation = stored(dataset.train), stored(dataset.validation)
    assert sorted(train + validation) == written("train", 6)
    assert not set(train) & set(validation)


def test_validation_slice_is_fixed_across_loads(tiny_data_dir, no_download):
    first = load_dataset("kdq_tiny_images", data_dir=str(tiny_data_dir))
    second = load_dataset("kdq_tiny_images", data_dir=str(tiny_data_dir))
    assert stored(first.validation) == stored(second.validation)


@pytest.fixture
def three_splits_dir(tmp_path):
    """A data dir where the three-split dataset is prepared as array_record files."""
    KdqTinyThreeSplits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    return tmp_path


def test_own_validation_split_is_used_when_distinct_from_test(three_splits_dir, no_download):
    dataset = load_dataset("kdq_tiny_three_splits", data_dir=str(three_splits_dir))
    assert stored(dataset.train) == written("train", 10)
    assert stored(dataset.validation) == written("validation", 4)
    assert stored(dataset.test) == written("test", 3)


def test_missing_split_names_the_split_and_the_prepare_command(
    tiny_data_dir, no_download, monkeypatch
):
    # As if kdq_tiny_images were a CATALOG dataset read from "train" and "test".
    monkeypatch.setitem(catalog_module.CATALOG, "kdq_tiny_images", CatalogEntry())
    with pytest.raises(DatasetNotPreparedError) as error:
        load_dataset("kdq_tiny_images", data_dir=str(tiny_data_dir))
    message = str(error.value)
    assert "has the splits train, validation" in message
    assert "test from 'test'" in message and "test is not prepared" in message
    assert f"tfds build kdq_tiny_images --data_dir={tiny_data_dir}" in message


def test_empty_validation_slice_raises(tiny_data_dir, no_download, monkeypatch):
    # The last 5 % of 6 examples rounds to none.
    monkeypatch.setattr(catalog_module, "VALIDATION_PERCENT", 5)
    with pytest.raises(ValueError, match=r"validation split 'train\[95%:\]' is empty"):
        load_dataset("kdq_tiny_images", data_dir=str(tiny_data_dir))


@pytest.mark.parametrize("num_threads", [0, 4])
def test_out_of_range_tfds_label_reaches_the_caller(num_threads):
    records = [{"image": tiny_image("train", i), "label": np.int64(i)} for i in range(4)]
    source = TfdsSource(records, num_classes=3, split="tiny train")
    with pytest.raises(ValueError, match=r"tiny train example 3 has label 3, outside \[0, 3\)"):
        features = ImageFeatures((4, 5, 3), 255.0)
        list(eval_batches(source, batch_size=2, features=features, num_threads=num_threads))


def test_dataset_prepared_without_random_access_gets_the_rebuild_command(
    tiny_data_dir, no_download
):
    info_path = tiny_data_dir / "kdq_tiny_images" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(DatasetNotPreparedError, match="stored as tfrecord") as error:
        load_dataset("kdq_tiny_images", data_dir=str(tiny_data_dir))
    assert f"--data_dir={tiny_data_dir} --file_format=array_record" in str(error.value)


def test_unprepared_dataset_error_names_dataset_dir_and_command(tmp_path, no_download):
    data_dir = str(tmp_path)
    with pytest.raises(DatasetNotPreparedError) as info:
        load_dataset("mnist", data_dir=data_dir)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "'mnist'" in message
    assert data_dir in message
    assert f"tfds build mnist --data_dir={data_dir} --file_format=array_record" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unprepared_manual_dataset_error_mentions_manual_dir(tmp_path, no_download):
    with pytest.raises(DatasetNotPreparedError, match="--manual_dir"):
        load_dataset("imagenet2012", data_dir=str(tmp_path))


def test_catalog_looks_in_kdq_data_dir_by_default(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("KDQ_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetNotPreparedError, match=f"--data_dir={tmp_path} "):
        load_dataset("cifar10")


def test_unknown_name_lists_known_datasets(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'") as info:
        load_dataset("no_such_dataset", data_dir=str(tmp_path))
    for known in ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet2012"):
        assert known in str(info.value)


def test_tfds_dataset_without_images_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'image' and 'label'"):
        load_dataset("imdb_reviews", data_dir=str(tmp_path))
