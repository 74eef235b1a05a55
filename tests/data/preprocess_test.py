import dataclasses
import itertools
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdq.data import (
    Augment,
    ImageFeatures,
    RandomAugment,
    default_augment,
    eval_batches,
    from_arrays,
    load_dataset,
    pad_and_crop,
    resize_and_center_crop,
    resize_bilinear,
    sample_inception_box,
    train_batches,
)

STANDARD_STATISTICS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
MEAN, STD = (0.2, 0.5, 0.7), (0.25, 0.1, 0.3)


def random_images(n, shape=(6, 5, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.uint8)


def standardised(images, mean, std):
    """float64 reference of (x / 255 - mean) / std."""
    return (images.astype(np.float64) / 255 - np.array(mean)) / np.array(std)


def box_constraints_hold(top, left, box_height, box_width, height, width):
    """Whether some real box, rounded to these sides, meets the area and aspect ranges."""
    inside = top >= 0 and left >= 0 and top + box_height <= height and left + box_width <= width
    area = height * width
    return (
        inside
        and box_height >= 1
        and box_width >= 1
        and (box_width + 0.5) * (box_height + 0.5) >= 0.08 * area
        and (box_width - 0.5) * (box_height - 0.5) <= area
        and (box_width + 0.5) / (box_height - 0.5) >= 3 / 4
        and (box_width - 0.5) / (box_height + 0.5) <= 4 / 3
    )


# Normalisation.


@pytest.mark.parametrize("name", sorted(STANDARD_STATISTICS))
def test_catalog_datasets_carry_their_standard_statistics(name, tmp_path):
    with tfds.testing.mock_data(num_examples=2):
        dataset = load_dataset(name, data_dir=str(tmp_path), image_size=8)
    assert (dataset.features.mean, dataset.features.std) == STANDARD_STATISTICS[name]


def test_digits_and_arrays_have_no_statistics_unless_given(digits):
    assert digits.features.mean is None and digits.features.std is None
    plain = from_arrays((random_images(2), np.zeros(2, int)), (random_images(2), np.zeros(2, int)))
    assert plain.features.mean is None and plain.features.std is None
    given = from_arrays(
        (random_images(2), np.zeros(2, int)),
        (random_images(2), np.zeros(2, int)),
        mean=np.array(MEAN),
        std=list(STD),
    )
    assert (given.features.mean, given.features.std) == (MEAN, STD)


def test_normalised_batches_match_numpy():
    train_images, test_images = random_images(12, seed=1), random_images(5, seed=2)
    dataset = from_arrays(
        (train_images, np.arange(12)), (test_images, np.arange(5)), mean=MEAN, std=STD
    )
    features = dataset.features.normalized()
    batch = next(train_batches(dataset, batch_size=4, seed=0, features=features))
    expected = standardised(train_images[batch["label"]], MEAN, STD)
    assert batch["image"].dtype == np.float32
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)
    bare = ImageFeatures((6, 5, 3), 255, mean=MEAN, std=STD, normalize=True)
    (evaluated,) = eval_batches(dataset.test, batch_size=5, features=bare)
    np.testing.assert_allclose(
        evaluated["image"], standardised(test_images, MEAN, STD), rtol=1e-5, atol=1e-5
    )


def test_normalisation_is_off_unless_the_features_are_normalized():
    images = random_images(8)
    dataset = from_arrays((images, np.arange(8)), (images, np.arange(8)), mean=MEAN, std=STD)
    assert not dataset.features.normalize
    batch = next(train_batches(dataset, batch_size=8, seed=0))
    np.testing.assert_array_equal(batch["image"], images[batch["label"]] / np.float32(255))
    (evaluated,) = eval_batches(dataset, batch_size=8, features=dataset.features)
    np.testing.assert_array_equal(evaluated["image"], images / np.float32(255))


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        (MEAN, None, "together"),
        (None, STD, "together"),
        ((0.5,), (0.2,), r"one value per channel \(3\)"),
        (MEAN, (0.1, 0.0, 0.2), "positive"),
        ((0.1, math.nan, 0.2), STD, "finite"),
    ],
)
def test_invalid_statistics_raise(mean, std, match):
    images = random_images(4)
    dataset = from_arrays((images, np.arange(4)), (images, np.arange(4)))
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(dataset.features, mean=mean, std=std)
    with pytest.raises(ValueError, match=match):
        ImageFeatures((6, 5, 3), 255, mean=mean, std=std)
    with pytest.raises(ValueError, match=match):
        from_arrays((images, np.arange(4)), (images, np.arange(4)), mean=mean, std=std)


# Default augmentation.


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", Augment(crop_padding=4, horizontal_flip=True)),
        ("cifar100", Augment(crop_padding=4, horizontal_flip=True)),
        ("cifar10:3.0.2", Augment(crop_padding=4, horizontal_flip=True)),
        ("imagenet2012", Augment(horizontal_flip=True, inception_crop=True)),
        ("mnist", Augment()),
        ("fashion_mnist", Augment()),
        ("digits", Augment()),
    ],
)
def test_default_augment(name, expected):
    assert default_augment(name) == expected


def test_inception_crop_excludes_the_padded_crop():
    assert Augment(inception_crop=True).enabled
    with pytest.raises(ValueError, match="choose one"):
        Augment(crop_padding=4, inception_crop=True)


# Inception box sampler.


@pytest.mark.parametrize("shape", [(224, 224), (375, 500), (500, 333), (31, 40), (7, 9)])
def test_inception_boxes_meet_the_area_and_aspect_ranges(shape):
    for seed in range(300):
        box = sample_inception_box(np.random.default_rng(seed), *shape)
        assert box_constraints_hold(*box, *shape), (seed, box)


def test_inception_boxes_span_the_ranges_on_a_large_image():
    boxes = np.array(
        [sample_inception_box(np.random.default_rng(seed), 1000, 1000) for seed in range(2000)]
    )
    tops, lefts, heights, widths = boxes.T
    fractions = heights * widths / 1e6
    log_aspects = np.log(widths / heights)
    assert 0.079 < fractions.min() < 0.1 and fractions.max() > 0.9
    assert np.log(3 / 4) - 0.003 < log_aspects.min() < np.log(0.8)
    assert np.log(1.25) < log_aspects.max() < np.log(4 / 3) + 0.003
    assert abs(log_aspects.mean()) < 0.02
    assert len(set(tops.tolist())) > 300 and len(set(lefts.tolist())) > 300


def test_inception_box_falls_back_to_a_centred_clipped_box():
    rng = np.random.default_rng(0)
    # No box of area >= 8% of 10 x 1000 with aspect <= 4/3 fits in 10 rows.
    assert sample_inception_box(rng, 10, 1000) == (0, 493, 10, 13)
    assert sample_inception_box(rng, 1000, 10) == (493, 0, 13, 10)
    assert sample_inception_box(rng, 30, 35, attempts=0) == (0, 0, 30, 35)


# Resizing and the evaluation crop.


def test_resize_bilinear_dtypes_and_constant_images():
    image = np.empty((5, 9, 3), dtype=np.uint8)
    image[...] = (10, 200, 33)
    resized = resize_bilinear(image, (12, 4))
    assert resized.shape == (12, 4, 3) and resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, np.broadcast_to(image[0, 0], (12, 4, 3)))
    wide = resize_bilinear(np.full((3, 3, 2), 4095, dtype=np.int32), (6, 5))
    assert wide.dtype == np.float32
    np.testing.assert_array_equal(wide, np.full((6, 5, 2), 4095, dtype=np.float32))


def test_eval_crop_without_resizing_keeps_the_central_window():
    # round(7 / 0.875) = 8 is already the shorter side.
    wide = np.arange(8 * 12 * 2, dtype=np.float32).reshape(8, 12, 2)
    np.testing.assert_array_equal(resize_and_center_crop(wide, 7), wide[0:7, 2:9])
    tall = np.arange(12 * 8, dtype=np.uint8).reshape(12, 8, 1)
    np.testing.assert_array_equal(resize_and_center_crop(tall, 7), tall[2:9, 0:7])


def test_eval_crop_of_a_linear_image_by_hand():
    # 64 x 80 halves to 32 x 40 (shorter side round(28 / 0.875) = 32). Halving a
    # ramp of slope 2 with the bilinear filter (taps 1/8, 3/8, 3/8, 1/8) gives
    # 4 * i + 1 away from the border; the 28 x 28 crop starts at (2, 6).
    rows, cols = np.meshgrid(np.arange(64), np.arange(80), indexing="ij")
    image = np.stack([2 * rows, 2 * cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)
    y, x = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    expected = np.stack([4 * (y + 2) + 1, 4 * (x + 6) + 1, np.full_like(y, 7)], axis=-1)
    cropped = resize_and_center_crop(image, 28)
    assert cropped.dtype == np.uint8
    np.testing.assert_array_equal(cropped, expected)
    transposed = resize_and_center_crop(image.transpose(1, 0, 2), 28)
    np.testing.assert_array_equal(transposed, expected.transpose(1, 0, 2))


# The Inception crop as an augmentation.


def test_inception_crop_resizes_the_sampled_box():
    rows, cols = np.meshgrid(np.arange(90), np.arange(120), indexing="ij")
    image = np.stack([rows, cols], axis=-1).astype(np.float32)
    transform = RandomAugment(Augment(inception_crop=True), image_size=(16, 12))
    for seed in range(30):
        out = transform.random_map({"image": image, "label": 1}, np.random.default_rng(seed))
        top, left, height, width = sample_inception_box(np.random.default_rng(seed), 90, 120)
        assert out["image"].shape == (16, 12, 2) and out["label"] == 1
        np.testing.assert_array_equal(
            out["image"], resize_bilinear(image[top : top + height, left : left + width], (16, 12))
        )
        # The coordinates the output holds are centred on the box.
        centre = out["image"].reshape(-1, 2).mean(axis=0)
        np.testing.assert_allclose(
            centre, (top + (height - 1) / 2, left + (width - 1) / 2), atol=1e-2
        )


def test_inception_crop_keeps_the_input_size_by_default():
    image = random_images(1, shape=(9, 14, 3))[0]
    out = RandomAugment(Augment(inception_crop=True)).random_map(
        {"image": image, "label": 0}, np.random.default_rng(0)
    )
    assert out["image"].shape == (9, 14, 3) and out["image"].dtype == np.uint8


def test_inception_crop_stream_is_fixed_by_the_seed():
    images = random_images(40, shape=(24, 20, 3))
    dataset = from_arrays((images, np.arange(40)), (images[:4], np.arange(4)))
    augment = Augment(horizontal_flip=True, inception_crop=True)

    def stream(seed, start_step=0):
        batches = train_batches(
            dataset, batch_size=8, seed=seed, start_step=start_step, augment=augment
        )
        return list(itertools.islice(batches, 4 - start_step))

    first, again, other = stream(3), stream(3), stream(4)
    for a, b in zip(first, again, strict=True):
        assert a["image"].shape == (8, 24, 20, 3) and a["image"].dtype == np.float32
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(first[2:], stream(3, start_step=2), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    # Same shuffle order per label would still differ in crops; compare by label.
    first_images = {int(k): v for b in first for k, v in zip(b["label"], b["image"], strict=True)}
    other_images = {int(k): v for b in other for k, v in zip(b["label"], b["image"], strict=True)}
    common = set(first_images) & set(other_images)
    assert common
    assert (
        sum(not np.array_equal(first_images[k], other_images[k]) for k in common) > len(common) // 2
    )


class ResizedSource:
    """Fixed-size zero images, with differently sized constant images as ``raw``."""

    def __init__(self, n):
        sizes = [(30 + i, 40 - i) for i in range(n)]
        self.raw = [
            {"image": np.full((*size, 3), 10 * i, dtype=np.uint8), "label": i}
            for i, size in enumerate(sizes)
        ]

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, index):
        return {"image": np.zeros((8, 8, 3), dtype=np.uint8), "label": self.raw[index]["label"]}


def test_inception_crop_reads_raw_images_and_crops_to_the_source_size():
    source = ResizedSource(12)
    augment = Augment(inception_crop=True)
    features = ImageFeatures((8, 8, 3), 255)
    batch = next(train_batches(source, batch_size=12, seed=0, augment=augment, features=features))
    assert batch["image"].shape == (12, 8, 8, 3)
    expected = np.broadcast_to(
        (10 * batch["label"] / np.float32(255))[:, None, None, None], (12, 8, 8, 3)
    )
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-6)
    (evaluated,) = eval_batches(source, batch_size=12, features=features)
    assert not evaluated["image"].any()


# Catalog datasets through the pipelines, on mock data.


def test_mocked_cifar10_default_augmentation_gives_normalised_crops(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        dataset = load_dataset("cifar10", data_dir=str(tmp_path))
        raw = [dataset.train[i]["image"] for i in range(8)]
        batches = train_batches(
            dataset,
            batch_size=8,
            seed=0,
            augment=default_augment("cifar10"),
            features=dataset.features.normalized(),
        )
        batch = next(batches)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    mean, std = np.array(dataset.features.mean), np.array(dataset.features.std)
    pixels = np.round((batch["image"] * std + mean) * 255)
    candidates = [
        crop
        for image in raw
        for top, left in itertools.product(range(9), repeat=2)
        for crop in (pad_and_crop(image, 4, top, left),)
        for crop in (crop, crop[:, ::-1])
    ]
    for image in pixels:
        assert any(np.array_equal(image, c) for c in candidates)


def test_mocked_imagenet_at_a_small_size_feeds_both_pipelines(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        dataset = load_dataset("imagenet2012", data_dir=str(tmp_path), image_size=32)
        assert dataset.features.shape == (32, 32, 3)
        raw_shapes = {dataset.train.raw[i]["image"].shape for i in range(6)}
        assert raw_shapes != {(32, 32, 3)}
        raw_test = [dataset.test.raw[i]["image"] for i in range(6)]
        features = dataset.features.normalized()
        batch = next(
            train_batches(
                dataset,
                batch_size=4,
                seed=0,
                augment=default_augment("imagenet2012"),
                features=features,
            )
        )
        evaluated = list(eval_batches(dataset, batch_size=4, features=features))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert len(evaluated) == 2
    for b in evaluated:
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    images = np.concatenate([b["image"] for b in evaluated])[:6]
    expected = np.stack([resize_and_center_crop(image, 32) for image in raw_test])
    np.testing.assert_allclose(
        images, standardised(expected, features.mean, features.std), atol=1e-5
    )


def test_image_size_resizes_other_datasets_only_when_given(tmp_path, digits_data_dir):
    with tfds.testing.mock_data(num_examples=2):
        assert load_dataset("cifar10", data_dir=str(tmp_path)).features.shape == (32, 32, 3)
        small = load_dataset("cifar10", data_dir=str(tmp_path), image_size=16)
        assert small.features.shape == (16, 16, 3)
        assert small.train[0]["image"].shape == (16, 16, 3)
    digits = load_dataset("digits", data_dir=digits_data_dir, image_size=12)
    assert digits.features.shape == (12, 12, 1) and digits.test[0]["image"].shape == (12, 12, 1)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", data_dir=digits_data_dir, image_size=0)
