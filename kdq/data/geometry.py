"""Image geometry for the standard ImageNet preprocessing, in numpy and PIL.

Training uses the Inception crop (a random resized crop): a box covering a
uniform fraction in [0.08, 1] of the image area, with a log-uniform aspect
ratio (width / height) in [3/4, 4/3], resized to the output size. Evaluation
resizes the shorter side to ``round(size / 0.875)`` and keeps the central
``size`` x ``size`` window.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

INCEPTION_AREA_RANGE = (0.08, 1.0)
INCEPTION_ASPECT_RANGE = (3 / 4, 4 / 3)
INCEPTION_ATTEMPTS = 10
EVAL_CROP_FRACTION = 0.875


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes an image with PIL's bilinear filter, which antialiases when shrinking.

    Args:
        image: Array of shape (H, W, C).
        size: Output (height, width).

    Returns:
        Array of shape (size[0], size[1], C): uint8 for a uint8 image (rounded),
        float32 for every other dtype.
    """
    height, width = size
    dtype = np.uint8 if image.dtype == np.uint8 else np.float32
    planes = [
        Image.fromarray(np.ascontiguousarray(image[..., channel], dtype=dtype)).resize(
            (width, height), Image.Resampling.BILINEAR
        )
        for channel in range(image.shape[2])
    ]
    return np.stack([np.asarray(plane) for plane in planes], axis=-1)


def sample_inception_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    area_range: tuple[float, float] = INCEPTION_AREA_RANGE,
    aspect_range: tuple[float, float] = INCEPTION_ASPECT_RANGE,
    attempts: int = INCEPTION_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """Samples the crop box of an Inception (random resized) crop.

    Each attempt draws an area fraction uniformly from ``area_range`` and an
    aspect ratio (width / height) log-uniformly from ``aspect_range``, rounds the
    box's sides to whole pixels and accepts the box if it fits in the image, at a
    uniformly drawn position. If no attempt fits, the box is the largest centred
    one whose aspect ratio is clipped into ``aspect_range``.

    Args:
        rng: Source of randomness.
        height: Image height in pixels.
        width: Image width in pixels.
        area_range: Range of the box area as a fraction of the image area.
        aspect_range: Range of the box aspect ratio, width / height.
        attempts: Number of draws before falling back to the centred box.

    Returns:
        (top, left, box_height, box_width) of a non-empty box inside the image.
    """
    area = height * width
    log_aspect_range = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(*log_aspect_range))
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            return top, left, box_height, box_width
    aspect = width / height
    if aspect < aspect_range[0]:
        box_width, box_height = width, round(width / aspect_range[0])
    elif aspect > aspect_range[1]:
        box_width, box_height = round(height * aspect_range[1]), height
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def resize_and_center_crop(
    image: np.ndarray, size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> np.ndarray:
    """Resizes the shorter side to ``round(size / crop_fraction)`` and crops the centre.

    The longer side is scaled by the same factor (rounded to whole pixels); the
    central ``size`` x ``size`` window is kept, its offset rounded down.

    Args:
        image: Array of shape (H, W, C).
        size: Side of the square output.
        crop_fraction: Fraction of the resized shorter side the output spans;
            0.875 is the standard ImageNet evaluation crop, 1 keeps the whole
            shorter side.

    Returns:
        Array of shape (size, size, C), dtype as ``resize_bilinear`` returns.
    """
    height, width = image.shape[:2]
    short = round(size / crop_fraction)
    if height <= width:
        resized_height, resized_width = short, round(width * short / height)
    else:
        resized_height, resized_width = round(height * short / width), short
    resized = resize_bilinear(image, (resized_height, resized_width))
    top = (resized_height - size) // 2
    left = (resized_width - size) // 2
    return resized[top : top + size, left : left + size]
