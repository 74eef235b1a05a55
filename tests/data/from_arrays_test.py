import numpy as np
import pytest

from kdq.data import from_arrays


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
    assert dataset.image_shape == (5, 4, 3)
    assert dataset.num_classes == 7
    assert dataset.pixel_scale == 255
    for source, (images, labels) in ((dataset.train, train), (dataset.test, test)):
        for i in range(len(labels)):
            example = source[i]
            np.testing.assert_array_equal(example["image"], images[i])
            assert example["label"] == labels[i]
            assert isinstance(example["label"], int)


def test_grayscale_images_get_a_channel_axis_and_classes_are_inferred():
    images = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2) / 11
    dataset = from_arrays((images, np.array([0, 4, 1])), (images[:1], np.array([2])))
    assert dataset.image_shape == (2, 2, 1)
    assert dataset.num_classes == 5
    assert dataset.pixel_scale == 1.0
    np.testing.assert_array_equal(dataset.train[2]["image"][..., 0], images[2])


def test_explicit_pixel_scale_is_kept():
    dataset = from_arrays(_split(2, dtype=np.int32), _split(2, dtype=np.int32), pixel_scale=4095)
    assert dataset.pixel_scale == 4095.0


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


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_pixels_raise(value, word):
    images = np.zeros((3, 2, 2), dtype=np.float32)
    images[1, 0, 1] = value
    with pytest.raises(ValueError, match=f"test images contain {word}"):
        from_arrays((np.zeros((3, 2, 2)), np.zeros(3, int)), (images, np.zeros(3, int)))


def test_mismatched_splits_raise():
    with pytest.raises(ValueError, match="shape"):
        from_arrays(_split(3, shape=(4, 4, 1)), _split(3, shape=(4, 4, 3)))
    with pytest.raises(ValueError, match="dtype"):
        from_arrays(_split(3, dtype=np.uint8), _split(3, dtype=np.float32))


def test_labels_outside_the_class_range_raise():
    images = np.zeros((3, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 3\), found values in \[0, 3\]"):
        from_arrays((images, np.array([0, 1, 3])), (images, np.array([0, 0, 0])), num_classes=3)
    with pytest.raises(ValueError, match=r"found values in \[-1, 1\]"):
        from_arrays((images, np.array([0, 1, 1])), (images, np.array([0, -1, 0])))


def test_non_positive_pixel_scale_raises():
    with pytest.raises(ValueError, match="pixel_scale"):
        from_arrays(_split(2), _split(2), pixel_scale=0)
