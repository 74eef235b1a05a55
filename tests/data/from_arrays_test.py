import numpy as np
import pytest

from kdq.data import eval_batches, from_arrays


def _split(n: int, shape=(5, 4, 3), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape)).astype(dtype)
    labels = rng.integers(0, 7, size=n)
    return images, labels


def test_round_trip_returns_the_given_rows():
    train, test = _split(11, seed=1), _split(4, seed=2)
    dataset = from_arrays(train, test, num_classes=7, name="mine")
    assert dataset.name == "mine"
    assert (len(dataset.train), len(dataset.test)) == (11, 4)
    assert dataset.features.shape == (5, 4, 3)
    assert dataset.num_classes == 7
    assert dataset.features.pixel_scale == 255
    for source, (images, labels) in ((dataset.train, train), (dataset.test, test)):
        for i in range(len(labels)):
            example = source[i]
            np.testing.assert_array_equal(example["image"], images[i])
            assert example["label"] == labels[i]
            assert isinstance(example["label"], int)


def test_validation_arrays_become_the_validation_split():
    train, test, validation = _split(11, seed=1), _split(4, seed=2), _split(5, seed=3)
    dataset = from_arrays(train, test, validation, num_classes=7)
    assert len(dataset.validation) == 5
    for i in range(5):
        np.testing.assert_array_equal(dataset.validation[i]["image"], validation[0][i])
        assert dataset.validation[i]["label"] == validation[1][i]
    (batch,) = eval_batches(dataset, batch_size=5, split="validation")
    np.testing.assert_array_equal(batch["label"], validation[1])


def test_without_validation_arrays_there_is_no_validation_split():
    dataset = from_arrays(_split(3), _split(2))
    assert dataset.validation is None
    with pytest.raises(ValueError, match="dataset 'arrays' has no validation split"):
        eval_batches(dataset, batch_size=2, split="validation")
    with pytest.raises(ValueError, match="split must be one of train, validation, test"):
        eval_batches(dataset, batch_size=2, split="val")


def test_num_classes_is_inferred_from_every_split():
    images = np.zeros((2, 2, 2))
    dataset = from_arrays(
        (images, np.array([0, 1])), (images, np.array([1, 0])), (images, np.array([5, 0]))
    )
    assert dataset.num_classes == 6


def test_grayscale_images_get_a_channel_axis_and_classes_are_inferred():
    images = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2) / 11
    dataset = from_arrays((images, np.array([0, 4, 1])), (images[:1], np.array([2])))
    assert dataset.features.shape == (2, 2, 1)
    assert dataset.num_classes == 5
    assert dataset.features.pixel_scale == 1.0
    np.testing.assert_array_equal(dataset.train[2]["image"][..., 0], images[2])


def test_explicit_pixel_scale_is_kept():
    dataset = from_arrays(_split(2, dtype=np.int32), _split(2, dtype=np.int32), pixel_scale=4095)
    assert dataset.features.pixel_scale == 4095.0


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ((np.zeros((4, 5)), np.zeros(4, int)), r"\(N, H, W, C\) or \(N, H, W\), got \(4, 5\)"),
        ((np.zeros((4, 2, 2, 1, 1)), np.zeros(4, int)), "got \\(4, 2, 2, 1, 1\\)"),
        ((np.zeros((0, 2, 2)), np.zeros(0, int)), "train split is empty"),
        ((np.zeros((4, 2, 2)), np.zeros(3, int)), r"labels must have shape \(4,\)"),
        ((np.zeros((4, 2, 2)), np.zeros((4, 1), int)), r"labels must have shape \(4,\)"),
        ((np.zeros((4, 2, 2)), np.zeros(4)), "labels must be integers"),
        ((np.zeros((4, 2, 2), dtype=str), np.zeros(4, int)), "images must be numeric"),
        ((np.zeros((4, 2, 2), dtype=bool), np.zeros(4, int)), "images must be numeric"),
    ],
)
def test_bad_shapes_and_dtypes_raise(train, match):
    with pytest.raises(ValueError, match=match):
        from_arrays(train, (np.zeros((1, 2, 2)), np.zeros(1, int)))
    # Validation arrays are checked the same way.
    validation_match = match.replace("train", "validation")
    with pytest.raises(ValueError, match=validation_match):
        from_arrays((np.zeros((1, 2, 2)), np.zeros(1, int)), (np.zeros((1, 2, 2)), [0]), train)


def test_a_split_that_is_not_a_pair_raises():
    with pytest.raises(ValueError, match="validation must be a pair"):
        from_arrays(_split(2), _split(2), np.zeros((2, 5, 4, 3)))


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_pixels_raise(value, word):
    images = np.zeros((3, 2, 2), dtype=np.float32)
    images[1, 0, 1] = value
    clean = (np.zeros((3, 2, 2), np.float32), np.zeros(3, int))
    with pytest.raises(ValueError, match=f"test images contain {word} \\(first in example 1\\)"):
        from_arrays(clean, (images, np.zeros(3, int)))
    with pytest.raises(ValueError, match=f"validation images contain {word}"):
        from_arrays(clean, clean, (images, np.zeros(3, int)))


def test_mismatched_splits_raise():
    with pytest.raises(ValueError, match="shape"):
        from_arrays(_split(3, shape=(4, 4, 1)), _split(3, shape=(4, 4, 3)))
    with pytest.raises(ValueError, match="dtype"):
        from_arrays(_split(3, dtype=np.uint8), _split(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"but validation images \(5, 4, 3\)"):
        from_arrays(_split(3, shape=(4, 4, 1)), _split(3, shape=(4, 4, 1)), _split(3))
    with pytest.raises(ValueError, match="but validation images float32"):
        from_arrays(_split(3), _split(3), _split(3, dtype=np.float32))


def test_labels_outside_the_class_range_raise():
    images = np.zeros((3, 2, 2))
    zeros = (images, np.array([0, 0, 0]))
    with pytest.raises(ValueError, match=r"train label 3 at index 2 is outside \[0, 3\)"):
        from_arrays((images, np.array([0, 1, 3])), zeros, num_classes=3)
    with pytest.raises(ValueError, match=r"test label -1 at index 1 is outside \[0, 2\)"):
        from_arrays((images, np.array([0, 1, 1])), (images, np.array([0, -1, 0])))
    with pytest.raises(ValueError, match=r"validation label 4 at index 0 is outside \[0, 3\)"):
        from_arrays(zeros, zeros, (images, np.array([4, 0, 0])), num_classes=3)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True, "3"])
def test_num_classes_that_is_not_a_positive_integer_raises(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        from_arrays(_split(2), _split(2), num_classes=num_classes)


def test_non_positive_pixel_scale_raises():
    with pytest.raises(ValueError, match="pixel_scale"):
        from_arrays(_split(2), _split(2), pixel_scale=0)
