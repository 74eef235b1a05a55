"""Labels and pixels are checked as they enter the pipelines, for every kind of source."""

import numpy as np
import pytest

from kdq.data import (
    ArraySource,
    ImageFeatures,
    check_label,
    eval_batches,
    from_arrays,
    train_batches,
)

FEATURES = ImageFeatures((2, 2, 1), pixel_scale=1.0)


class ListSource:
    """A user's own source: no ``num_classes`` or ``split`` attribute."""

    def __init__(self, examples):
        self._examples = examples

    def __len__(self):
        return len(self._examples)

    def __getitem__(self, index):
        return self._examples[index]


def examples_with(label, index: int = 5, n: int = 8, image=None):
    examples = [{"image": np.zeros((2, 2, 1), np.uint8), "label": i % 3} for i in range(n)]
    examples[index] = {
        "image": examples[index]["image"] if image is None else image,
        "label": label,
    }
    return examples


def read_all(pipeline: str, source, num_threads: int, **options):
    options = {"features": FEATURES, "num_threads": num_threads, **options}
    if pipeline == "train":
        # One epoch of 8 visits every example.
        return next(train_batches(source, batch_size=8, seed=0, **options))
    return list(eval_batches(source, batch_size=3, **options))


@pytest.mark.parametrize("num_threads", [0, 4])
@pytest.mark.parametrize("pipeline", ["train", "eval"])
def test_out_of_range_label_error_names_split_index_value_and_bound(pipeline, num_threads):
    source = ListSource(examples_with(7))
    with pytest.raises(ValueError) as error:
        read_all(pipeline, source, num_threads, num_classes=3)
    message = str(error.value)
    assert "source example 5 has label 7, outside [0, 3), num_classes=3" in message
    assert "pass the dataset's true number of classes" in message


@pytest.mark.parametrize("pipeline", ["train", "eval"])
@pytest.mark.parametrize(
    "label", [np.array([1]), np.array([0, 1, 0]), 1.0, np.float32(2), True, "1"]
)
def test_label_that_is_not_a_scalar_integer_raises(pipeline, label):
    with pytest.raises(ValueError, match="source example 5 has label .* scalar integer"):
        read_all(pipeline, ListSource(examples_with(label)), num_threads=4)


@pytest.mark.parametrize("pipeline", ["train", "eval"])
def test_negative_label_raises_without_num_classes(pipeline):
    with pytest.raises(ValueError, match=r"example 5 has label -1, outside \[0, num_classes\)"):
        read_all(pipeline, ListSource(examples_with(-1)), num_threads=4)


@pytest.mark.parametrize("pipeline", ["train", "eval"])
def test_non_finite_float_image_raises(pipeline):
    image = np.zeros((2, 2, 1), np.float32)
    image[1, 0, 0] = np.nan
    examples = [{**e, "image": e["image"].astype(np.float32)} for e in examples_with(0)]
    examples[5]["image"] = image
    with pytest.raises(ValueError, match="source example 5 has a NaN or inf pixel"):
        read_all(pipeline, ListSource(examples), num_threads=4)


def test_source_num_classes_is_used_and_split_named():
    labels = np.array([0, 1, 2, 1, 0, 4, 1, 2])
    source = ArraySource(np.zeros((8, 2, 2, 1), np.uint8), labels, num_classes=3, split="mine")
    with pytest.raises(ValueError, match=r"mine example 5 has label 4, outside \[0, 3\)"):
        read_all("eval", source, num_threads=4)
    with pytest.raises(ValueError, match="num_classes=5 but the mine split has 3 classes"):
        eval_batches(source, batch_size=3, features=FEATURES, num_classes=5)


def test_dataset_num_classes_bounds_every_split_and_bad_num_classes_raise():
    images = np.zeros((4, 2, 2), np.uint8)
    dataset = from_arrays((images, np.array([0, 1, 2, 3])), (images, np.array([0, 1, 2, 3])))
    assert [b["label"].tolist() for b in eval_batches(dataset, batch_size=4)] == [[0, 1, 2, 3]]
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            eval_batches(dataset.test, batch_size=4, features=FEATURES, num_classes=bad)


def test_valid_labels_pass_through_unchanged():
    labels = [0, 2, 1, 2, 0, 1, 1, 2]
    examples = [
        {"image": np.full((2, 2, 1), i, np.uint8), "label": np.int64(label)}
        for i, label in enumerate(labels)
    ]
    batches = read_all("eval", ListSource(examples), num_threads=4, num_classes=3)
    assert np.concatenate([b["label"][b["mask"]] for b in batches]).tolist() == labels
    assert all(b["label"].dtype == np.int32 and b["label"].shape == (3,) for b in batches)


def test_check_label_accepts_numpy_and_python_integers():
    assert check_label(np.int64(2), 3, split="s", index=0) == 2
    assert check_label(np.array(1, np.uint8), 3, split="s", index=0) == 1
    assert check_label(0, None, split="s", index=0) == 0
