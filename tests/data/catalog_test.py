import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdq.data import (
    DatasetNotPreparedError,
    eval_batches,
    load_dataset,
    train_batches,
)


def tiny_image(split: str, i: int) -> np.ndarray:
    offset = 7 * i + (3 if split == "validation" else 0)
    return ((np.arange(60).reshape(4, 5, 3) * 4 + offset) % 256).astype(np.uint8)


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
        assert (len(dataset.train), len(dataset.test)) == (6, 6)
        assert dataset.image_shape == image_shape
        assert dataset.num_classes == num_classes
        assert dataset.pixel_scale == 255
        for i in range(6):
            example = dataset.train[i]
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
        assert dataset.image_shape == (224, 224, 3)
        assert dataset.num_classes == 1000
        assert dataset.test[1]["image"].shape == (224, 224, 3)


def test_prepared_tfds_dataset_is_read_from_array_record_files(tiny_data_dir, no_download):
    dataset = load_dataset("kdq_tiny_images", data_dir=str(tiny_data_dir))
    assert (len(dataset.train), len(dataset.test)) == (6, 4)
    assert (dataset.image_shape, dataset.num_classes, dataset.pixel_scale) == ((4, 5, 3), 3, 255)
    for source, split in ((dataset.train, "train"), (dataset.test, "validation")):
        stored = sorted(
            (source[i]["label"], source[i]["image"].tobytes()) for i in range(len(source))
        )
        written = sorted((i % 3, tiny_image(split, i).tobytes()) for i in range(len(source)))
        assert stored == written


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
