"""Training-time image augmentation as grain random transforms."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from kdq.data.features import ImageExample
from kdq.data.geometry import resize_bilinear, sample_inception_box


@dataclasses.dataclass(frozen=True)
class Augment:
    """Which augmentations ``train_batches`` applies; all are off by default.

    Attributes:
        crop_padding: Pad every side with this many zero pixels, then crop a random
            window of the original size (0 disables the crop).
        horizontal_flip: Mirror left-right with probability 1/2. Keep it off for
            data whose meaning changes when mirrored, such as digits.
        inception_crop: Crop a random box (``sample_inception_box``) and resize it
            bilinearly to the dataset's image size. ``train_batches`` then reads
            a source's uncropped images from its ``raw`` attribute when it has
            one (imagenet2012). Excludes ``crop_padding``.
    """

    crop_padding: int = 0
    horizontal_flip: bool = False
    inception_crop: bool = False

    def __post_init__(self):
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.inception_crop and self.crop_padding > 0:
            raise ValueError("inception_crop and crop_padding > 0 are two crops; choose one")

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is switched on."""
        return self.crop_padding > 0 or self.horizontal_flip or self.inception_crop


def pad_and_crop(image: np.ndarray, padding: int, top: int, left: int) -> np.ndarray:
    """Zero-pads an image on every side and crops a window of the original size.

    Args:
        image: Array of shape (H, W, C).
        padding: Number of zero pixels added on each side.
        top: Row of the window in the padded image, in [0, 2 * padding].
        left: Column of the window in the padded image, in [0, 2 * padding].

    Returns:
        Array of the same shape and dtype as ``image``; ``top == left == padding``
        returns the image unchanged.
    """
    height, width = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return padded[top : top + height, left : left + width]


class RandomAugment(grain.transforms.RandomMap):
    """Random crop (padded or Inception), then random horizontal flip, on raw examples.

    Grain seeds ``rng`` from the pipeline seed and the example's position in the
    stream, so the result is deterministic given both.

    Args:
        config: Which augmentations to apply.
        image_size: (height, width) the Inception crop is resized to; None keeps
            each input image's size.
    """

    def __init__(self, config: Augment, image_size: tuple[int, int] | None = None):
        self.config = config
        self.image_size = image_size

    def random_map(self, element: ImageExample, rng: np.random.Generator) -> ImageExample:
        """Augments one example.

        Args:
            element: Example with an (H, W, C) "image".
            rng: Generator supplied by grain.

        Returns:
            The example with its image augmented; other fields unchanged.
        """
        image = element["image"]
        if self.config.inception_crop:
            top, left, height, width = sample_inception_box(rng, *image.shape[:2])
            box = image[top : top + height, left : left + width]
            image = resize_bilinear(box, self.image_size or image.shape[:2])
        padding = self.config.crop_padding
        if padding > 0:
            top, left = rng.integers(0, 2 * padding + 1, size=2)
            image = pad_and_crop(image, padding, int(top), int(left))
        if self.config.horizontal_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {**element, "image": image}
