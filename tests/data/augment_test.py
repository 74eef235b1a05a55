import itertools

import numpy as np
import pytest

from kdq.data import Augment, RandomAugment, pad_and_crop

IMAGE = np.arange(1, 10, dtype=np.uint8).reshape(3, 3, 1)


def reference_crop(image, padding, top, left):
    """Pixel (i, j) of the window reads source pixel (i + top - p, j + left - p) or 0."""
    height, width = image.shape[:2]
    out = np.zeros_like(image)
    for i, j in itertools.product(range(height), range(width)):
        source_i, source_j = i + top - padding, j + left - padding
        if 0 <= source_i < height and 0 <= source_j < width:
            out[i, j] = image[source_i, source_j]
    return out


def matching_offsets(output, image, padding):
    offsets = itertools.product(range(2 * padding + 1), repeat=2)
    return [o for o in offsets if np.array_equal(output, reference_crop(image, padding, *o))]


def test_pad_and_crop_on_a_hand_made_image():
    top_left = pad_and_crop(IMAGE, 1, 0, 0)
    np.testing.assert_array_equal(top_left[..., 0], [[0, 0, 0], [0, 1, 2], [0, 4, 5]])
    bottom_middle = pad_and_crop(IMAGE, 1, 2, 1)
    np.testing.assert_array_equal(bottom_middle[..., 0], [[4, 5, 6], [7, 8, 9], [0, 0, 0]])
    np.testing.assert_array_equal(pad_and_crop(IMAGE, 1, 1, 1), IMAGE)


def test_pad_and_crop_matches_reference_for_every_offset():
    image = np.random.default_rng(0).integers(1, 255, size=(4, 5, 2)).astype(np.uint8)
    for top, left in itertools.product(range(5), repeat=2):
        cropped = pad_and_crop(image, 2, top, left)
        assert cropped.dtype == image.dtype
        np.testing.assert_array_equal(cropped, reference_crop(image, 2, top, left))


def test_random_crop_draws_every_offset_and_never_flips():
    transform = RandomAugment(Augment(crop_padding=1))
    seen = set()
    for seed in range(200):
        out = transform.random_map({"image": IMAGE, "label": 3}, np.random.default_rng(seed))
        assert out["label"] == 3
        (offset,) = matching_offsets(out["image"], IMAGE, 1)
        seen.add(offset)
    assert seen == set(itertools.product(range(3), repeat=2))


def test_random_flip_mirrors_about_half_the_time():
    transform = RandomAugment(Augment(horizontal_flip=True))
    flips = 0
    for seed in range(400):
        out = transform.random_map({"image": IMAGE, "label": 0}, np.random.default_rng(seed))
        if np.array_equal(out["image"], IMAGE[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out["image"], IMAGE)
    assert 140 < flips < 260


def test_crop_then_flip_gives_a_mirrored_or_plain_window():
    transform = RandomAugment(Augment(crop_padding=1, horizontal_flip=True))
    kinds = set()
    for seed in range(100):
        out = transform.random_map({"image": IMAGE, "label": 0}, np.random.default_rng(seed))
        plain = matching_offsets(out["image"], IMAGE, 1)
        mirrored = matching_offsets(out["image"][:, ::-1], IMAGE, 1)
        assert len(plain) + len(mirrored) >= 1
        kinds.add((bool(plain), bool(mirrored)))
    assert (True, False) in kinds and (False, True) in kinds


def test_same_generator_state_gives_same_augmentation():
    transform = RandomAugment(Augment(crop_padding=2, horizontal_flip=True))
    image = np.random.default_rng(1).integers(0, 255, size=(6, 6, 3)).astype(np.uint8)
    for seed in range(20):
        first = transform.random_map({"image": image, "label": 0}, np.random.default_rng(seed))
        again = transform.random_map({"image": image, "label": 0}, np.random.default_rng(seed))
        np.testing.assert_array_equal(first["image"], again["image"])


def test_augmentation_is_off_by_default():
    assert not Augment().enabled
    assert Augment(crop_padding=1).enabled
    assert Augment(horizontal_flip=True).enabled
    assert not Augment(crop_padding=2).horizontal_flip


def test_negative_padding_raises():
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)
