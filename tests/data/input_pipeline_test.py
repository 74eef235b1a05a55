import itertools
import time

import numpy as np
import pytest

from kdq.data import (
    Augment,
    ExampleSource,
    ImageFeatures,
    eval_batches,
    from_arrays,
    pad_and_crop,
    train_batches,
)


def indexed(n: int, shape=(3, 4, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Images that differ per example (and are not mirror-symmetric); label = index."""
    pattern = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    images = (np.arange(n, dtype=np.uint8)[:, None, None, None] * 3 + pattern).astype(np.uint8)
    return images, np.arange(n)


def indexed_dataset(n_train: int, n_test: int = 10):
    train, test = indexed(n_train), indexed(n_test)
    return from_arrays(train, (test[0][::-1], test[1]), num_classes=max(n_train, n_test))


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def normalised(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255)


def test_train_batch_structure_and_normalisation():
    images, _ = indexed(40)
    dataset = indexed_dataset(40)
    for batch in take(train_batches(dataset, batch_size=8, seed=0), 7):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (8, 3, 4, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["image"], normalised(images[batch["label"]]))


def test_digits_pixels_are_scaled_by_16(digits):
    batch = next(train_batches(digits, batch_size=256, seed=0))
    raw = np.stack([digits.train[i]["image"] for i in range(len(digits.train))])
    assert raw.max() == 16
    assert batch["image"].min() == 0.0 and batch["image"].max() == 1.0
    assert set(np.unique(batch["image"] * 16)) <= set(range(17))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = train_batches(indexed_dataset(48), batch_size=8, seed=5)
    epochs = [np.concatenate([b["label"] for b in take(stream, 6)]) for _ in range(3)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(48))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_remainder_is_dropped_per_epoch_and_varies():
    stream = train_batches(indexed_dataset(50), batch_size=8, seed=1)
    dropped = set()
    for _ in range(6):
        order = np.concatenate([b["label"] for b in take(stream, 6)])
        assert len(set(order.tolist())) == 48
        dropped |= set(range(50)) - set(order.tolist())
    assert len(dropped) > 2


def test_same_seed_same_order_other_seed_other_order():
    dataset = indexed_dataset(30)

    def labels(seed):
        return [
            b["label"].tolist() for b in take(train_batches(dataset, batch_size=5, seed=seed), 12)
        ]

    assert labels(3) == labels(3)
    assert labels(3) != labels(4)


@pytest.mark.parametrize("augment", [None, Augment(crop_padding=1, horizontal_flip=True)])
def test_resuming_at_step_k_equals_the_uninterrupted_stream(augment):
    dataset = indexed_dataset(50)
    full = take(train_batches(dataset, batch_size=8, seed=9, augment=augment), 20)
    for start in (1, 5, 6, 7, 13):
        resumed = take(
            train_batches(dataset, batch_size=8, seed=9, augment=augment, start_step=start),
            20 - start,
        )
        for expected, got in zip(full[start:], resumed, strict=True):
            np.testing.assert_array_equal(got["label"], expected["label"])
            np.testing.assert_array_equal(got["image"], expected["image"])


class CountingSource:
    def __init__(self, source: ExampleSource):
        self.source = source
        self.reads = []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.source[index]


def test_resuming_far_ahead_reads_only_what_it_yields():
    counting = CountingSource(indexed_dataset(1000).train)
    start = time.perf_counter()
    stream = train_batches(
        counting, batch_size=4, seed=0, start_step=10**12, features=ImageFeatures((3, 4, 1), 255)
    )
    batch = next(stream)
    assert time.perf_counter() - start < 5
    assert batch["label"].shape == (4,)
    assert len(counting.reads) < 100


def test_batch_size_larger_than_split_raises():
    with pytest.raises(ValueError, match=r"batch_size=51 .* split size 50"):
        train_batches(indexed_dataset(50), batch_size=51, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        train_batches(indexed_dataset(50), batch_size=0, seed=0)


def test_bare_source_needs_features():
    source = indexed_dataset(20).train
    with pytest.raises(ValueError, match="features is required"):
        train_batches(source, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="features is required"):
        eval_batches(source, batch_size=4)
    features = ImageFeatures((3, 4, 1), pixel_scale=2.0)
    batch = next(train_batches(source, batch_size=4, seed=0, features=features))
    images, _ = indexed(20)
    np.testing.assert_array_equal(
        batch["image"], images[batch["label"]].astype(np.float32) / np.float32(2)
    )


def test_augmented_training_images_are_crops_or_mirrors_of_the_originals():
    images, _ = indexed(24)
    stream = train_batches(
        indexed_dataset(24), batch_size=8, seed=2, augment=Augment(1, horizontal_flip=True)
    )
    changed = 0
    for batch in take(stream, 9):
        for image, label in zip(batch["image"], batch["label"], strict=True):
            candidates = [
                normalised(pad_and_crop(images[label], 1, top, left))
                for top, left in itertools.product(range(3), repeat=2)
            ]
            candidates += [c[:, ::-1] for c in candidates]
            assert any(np.array_equal(image, c) for c in candidates)
            changed += not np.array_equal(image, normalised(images[label]))
    assert changed > 36


def test_disabled_augment_config_changes_nothing():
    dataset = indexed_dataset(20)
    plain = take(train_batches(dataset, batch_size=5, seed=0), 6)
    noop = take(train_batches(dataset, batch_size=5, seed=0, augment=Augment()), 6)
    for a, b in zip(plain, noop, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize(("n", "batch_size", "num_batches"), [(50, 16, 4), (48, 16, 3), (3, 8, 1)])
def test_eval_pass_covers_every_example_once_in_order(n, batch_size, num_batches):
    dataset = indexed_dataset(60, n_test=n)
    test_images = np.stack([dataset.test[i]["image"] for i in range(n)])
    batches = list(eval_batches(dataset, batch_size=batch_size))
    assert len(batches) == num_batches
    for batch in batches:
        assert set(batch) == {"image", "label", "mask"}
        assert batch["image"].shape == (batch_size, 3, 4, 1)
        assert batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.bool_
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.tolist() == [True] * n + [False] * (num_batches * batch_size - n)
    np.testing.assert_array_equal(labels[:n], np.arange(n))
    np.testing.assert_array_equal(images[:n], normalised(test_images))
    assert not images[n:].any() and not labels[n:].any()


def test_eval_batches_of_digits_cover_the_test_split(digits):
    batches = list(eval_batches(digits, batch_size=128))
    assert [int(b["mask"].sum()) for b in batches] == [128, 128, 104]
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    expected = [digits.test[i]["label"] for i in range(len(digits.test))]
    assert labels.tolist() == expected


def grain_generator(seed: int, position: int) -> np.random.Generator:
    """The generator grain's random_map hands the example at ``position``: Philox keyed by
    ``seed``, its counter set to (0, 0, 0, position)."""
    generator = np.random.Generator(np.random.Philox(seed))
    state = generator.bit_generator.state
    state["state"]["counter"] = np.array([0, 0, 0, position], dtype=np.uint64)
    generator.bit_generator.state = state
    return generator


def test_augmented_digits_batches_equal_the_documented_computation(digits):
    # Epochs keep 1149 // 32 * 32 = 1120 examples (35 batches): steps 33..36 span two.
    seed, batch_size, start_step, num_batches = 3, 32, 33, 4
    stream = train_batches(
        digits,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        augment=Augment(crop_padding=1, horizontal_flip=True),
    )
    batches = take(stream, num_batches)
    n = len(digits.train)
    for step, batch in enumerate(batches, start=start_step):
        assert set(batch) == {"image", "label"}
        for row in range(batch_size):
            position = step * batch_size + row
            epoch, offset = divmod(position, 1120)
            index = np.random.default_rng([seed, epoch]).permutation(n)[offset]
            raw = np.asarray(digits.train[int(index)]["image"])
            generator = grain_generator(seed, position)
            top, left = generator.integers(0, 3, size=2)
            image = np.pad(raw, ((1, 1), (1, 1), (0, 0)))[top : top + 8, left : left + 8]
            if generator.random() < 0.5:
                image = image[:, ::-1]
            expected = image.astype(np.float32) / np.float32(16)
            assert batch["label"][row] == digits.train[int(index)]["label"]
            assert batch["image"][row].tobytes() == expected.tobytes()
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.dtype == np.int32


def test_digits_eval_pass_equals_the_documented_computation(digits):
    batches = list(eval_batches(digits, batch_size=128))
    raw = np.stack([digits.test[i]["image"] for i in range(360)])
    labels = np.array([digits.test[i]["label"] for i in range(360)], np.int32)
    padded = np.zeros((384, 8, 8, 1), np.float32)
    padded[:360] = raw.astype(np.float32) / np.float32(16)
    expected_labels = np.concatenate([labels, np.zeros(24, np.int32)])
    for i, batch in enumerate(batches):
        rows = slice(128 * i, 128 * (i + 1))
        assert batch["image"].tobytes() == padded[rows].tobytes()
        assert batch["label"].tobytes() == expected_labels[rows].tobytes()
        np.testing.assert_array_equal(batch["mask"], np.arange(384)[rows] < 360)
    assert len(batches) == 3
