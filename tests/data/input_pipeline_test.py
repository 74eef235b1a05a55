import itertools
import time

import numpy as np
import pytest

from kdq.data import (
    Augment,
    ExampleSource,
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
    stream = train_batches(counting, batch_size=4, seed=0, start_step=10**12, pixel_scale=255)
    batch = next(stream)
    assert time.perf_counter() - start < 5
    assert batch["label"].shape == (4,)
    assert len(counting.reads) < 100


def test_batch_size_larger_than_split_raises():
    with pytest.raises(ValueError, match=r"batch_size=51 .* split size 50"):
        train_batches(indexed_dataset(50), batch_size=51, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        train_batches(indexed_dataset(50), batch_size=0, seed=0)


def test_bare_source_needs_a_pixel_scale():
    source = indexed_dataset(20).train
    with pytest.raises(ValueError, match="pixel_scale"):
        train_batches(source, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="pixel_scale"):
        eval_batches(source, batch_size=4)
    batch = next(train_batches(source, batch_size=4, seed=0, pixel_scale=2.0))
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
