"""Features: ImageFeatures against numpy, and the pipelines carrying examples that are not images."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.data import (
    Augment,
    Dataset,
    Features,
    ImageFeatures,
    eval_batches,
    from_arrays,
    train_batches,
)

MEAN, STD = (0.2, 0.5, 0.7), (0.25, 0.1, 0.3)


@dataclasses.dataclass(frozen=True)
class TokenFeatures:
    """A token sequence per example: {"tokens": int (length,)}, each token below num_classes."""

    length: int

    def element_spec(self):
        return {"tokens": jax.ShapeDtypeStruct((self.length,), jnp.int32)}

    def check(self, example, *, split, index, num_classes):
        tokens = np.asarray(example["tokens"])
        too_large = num_classes is not None and tokens.max() >= num_classes
        if tokens.shape != (self.length,) or tokens.min() < 0 or too_large:
            raise ValueError(f"{split} example {index} has tokens {tokens.tolist()}")

    def prepare(self, example):
        return {"tokens": np.asarray(example["tokens"], np.int32)}

    def padding(self, example):
        return {"tokens": np.zeros_like(example["tokens"])}


def token_arrays(n, length=5, vocab=50, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, length))


def token_dataset(train_tokens, test_tokens, vocab=50):
    # A list of examples is a random-access source.
    return Dataset(
        name="tokens",
        train=[{"tokens": row} for row in train_tokens],
        test=[{"tokens": row} for row in test_tokens],
        features=TokenFeatures(train_tokens.shape[1]),
        num_classes=vocab,
    )


def test_token_features_are_features():
    assert isinstance(TokenFeatures(5), Features)
    assert isinstance(ImageFeatures((2, 2, 1), 1.0), Features)


def test_token_sequences_flow_through_train_batches_in_the_documented_order():
    train_tokens = token_arrays(13)
    dataset = token_dataset(train_tokens, token_arrays(4, seed=1))
    seed, batch_size = 7, 4
    # Epochs keep 13 // 4 * 4 = 12 examples: 3 batches each.
    batches = list(itertools.islice(train_batches(dataset, batch_size=4, seed=seed), 8))
    spec = dataset.features.element_spec()["tokens"]
    for step, batch in enumerate(batches):
        assert set(batch) == {"tokens"}
        assert batch["tokens"].shape == (batch_size, *spec.shape)
        assert batch["tokens"].dtype == spec.dtype
        positions = step * batch_size + np.arange(batch_size)
        rows = [np.random.default_rng([seed, p // 12]).permutation(13)[p % 12] for p in positions]
        np.testing.assert_array_equal(batch["tokens"], train_tokens[rows])


def test_token_sequences_flow_through_eval_batches_padded_and_masked():
    test_tokens = token_arrays(13, seed=2)
    dataset = token_dataset(token_arrays(6), test_tokens)
    batches = list(eval_batches(dataset, batch_size=5))
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"tokens", "mask"}
        assert batch["tokens"].shape == (5, 5) and batch["tokens"].dtype == np.int32
        assert batch["mask"].dtype == np.bool_
    tokens = np.concatenate([b["tokens"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(tokens[:13], test_tokens)
    assert not tokens[13:].any()
    assert mask.tolist() == [True] * 13 + [False] * 2


def test_a_bare_token_source_takes_features_and_its_check_reaches_the_caller():
    tokens = token_arrays(6)
    tokens[3, 2] = 50
    source = token_dataset(tokens, tokens).train
    with pytest.raises(ValueError, match="features is required"):
        eval_batches(source, batch_size=3)
    with pytest.raises(ValueError, match=r"source example 3 has tokens \[.*50"):
        list(eval_batches(source, batch_size=3, features=TokenFeatures(5), num_classes=50))
    with pytest.raises(ValueError, match=r"tokens train example 3 has tokens"):
        next(train_batches(token_dataset(tokens, tokens), batch_size=6, seed=0))


def test_augmentation_needs_image_features():
    dataset = token_dataset(token_arrays(8), token_arrays(2))
    with pytest.raises(ValueError, match="TokenFeatures, not ImageFeatures"):
        train_batches(dataset, batch_size=4, seed=0, augment=Augment(crop_padding=1))
    plain = next(train_batches(dataset, batch_size=4, seed=0))
    off = next(train_batches(dataset, batch_size=4, seed=0, augment=Augment()))
    np.testing.assert_array_equal(plain["tokens"], off["tokens"])


def test_dataset_and_pipelines_reject_what_is_not_features():
    tokens = token_arrays(4)
    source = token_dataset(tokens, tokens).train
    with pytest.raises(ValueError, match="features must implement kdq.data.Features"):
        Dataset(name="x", train=source, test=source, features={"tokens": 5})
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        Dataset(name="x", train=source, test=source, features=TokenFeatures(5), num_classes=0)
    with pytest.raises(ValueError, match="features must implement"):
        train_batches(source, batch_size=2, seed=0, features="tokens")


# ImageFeatures.


def test_image_features_prepare_matches_numpy_bitwise():
    image = np.random.default_rng(0).integers(0, 256, size=(4, 3, 3)).astype(np.uint8)
    plain = ImageFeatures((4, 3, 3), 255.0, MEAN, STD)
    scaled = image.astype(np.float32) / np.float32(255)
    prepared = plain.prepare({"image": image, "label": np.int64(2)})
    assert prepared["image"].tobytes() == scaled.tobytes()
    assert prepared["label"].dtype == np.int32 and prepared["label"] == 2
    standardised = (scaled - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    normalized = plain.normalized().prepare({"image": image, "label": 2})
    assert normalized["image"].dtype == np.float32
    assert normalized["image"].tobytes() == standardised.tobytes()


def test_normalized_turns_on_normalisation_only():
    features = ImageFeatures((4, 3, 3), 255, MEAN, STD)
    assert features.normalized() == dataclasses.replace(features, normalize=True)
    assert not features.normalize and features.normalized().normalize
    with pytest.raises(ValueError, match="normalize=True needs a per-channel mean and std"):
        ImageFeatures((4, 3, 1), 16).normalized()
    with pytest.raises(ValueError, match="normalize=True"):
        ImageFeatures((4, 3, 1), 16, normalize=True)


def test_image_features_element_spec_and_padding():
    features = ImageFeatures((4, 3, 2), 16)
    assert features.element_spec() == {
        "image": jax.ShapeDtypeStruct((4, 3, 2), jnp.float32),
        "label": jax.ShapeDtypeStruct((), jnp.int32),
    }
    padding = features.padding({"image": np.ones((4, 3, 2), np.uint8), "label": 7})
    assert padding["label"] == 0
    assert padding["image"].dtype == np.uint8 and not padding["image"].any()


def test_image_features_are_canonical_and_hashable():
    features = ImageFeatures(np.array([4, 3, 3]), 255, np.array(MEAN), list(STD))
    assert features == ImageFeatures((4, 3, 3), 255.0, MEAN, STD)
    assert hash(features) == hash(ImageFeatures((4, 3, 3), 255.0, MEAN, STD))
    assert type(features.shape[0]) is int and type(features.pixel_scale) is float


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1, 1), (0, 8, 1), (8, 8.0, 1), (True, 8, 1)])
def test_invalid_image_shape_raises(shape):
    with pytest.raises(ValueError, match="shape must be"):
        ImageFeatures(shape, 255)


@pytest.mark.parametrize("pixel_scale", [0, -1.0, math.inf, math.nan])
def test_invalid_pixel_scale_raises(pixel_scale):
    with pytest.raises(ValueError, match="pixel_scale must be positive and finite"):
        ImageFeatures((2, 2, 1), pixel_scale)


def test_image_features_check_names_split_index_and_value():
    features = ImageFeatures((2, 2, 1), 1.0)
    good = {"image": np.zeros((2, 2, 1), np.float32), "label": 1}
    features.check(good, split="s", index=0, num_classes=2)
    with pytest.raises(ValueError, match=r"s example 4 has label 2, outside \[0, 2\)"):
        features.check({**good, "label": 2}, split="s", index=4, num_classes=2)
    bad = np.zeros((2, 2, 1), np.float32)
    bad[0, 1, 0] = np.inf
    with pytest.raises(ValueError, match="s example 3 has a NaN or inf pixel"):
        features.check({**good, "image": bad}, split="s", index=3, num_classes=None)


def test_features_argument_overrides_the_datasets():
    images = np.random.default_rng(0).integers(0, 256, size=(6, 2, 2, 3)).astype(np.uint8)
    dataset = from_arrays((images, np.arange(6)), (images, np.arange(6)), mean=MEAN, std=STD)
    (plain,) = eval_batches(dataset, batch_size=6)
    (standardised,) = eval_batches(dataset, batch_size=6, features=dataset.features.normalized())
    scaled = images.astype(np.float32) / np.float32(255)
    assert plain["image"].tobytes() == scaled.tobytes()
    expected = (scaled - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    assert standardised["image"].tobytes() == expected.tobytes()
