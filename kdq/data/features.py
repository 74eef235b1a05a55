"""What one example of a dataset holds, how it is checked, and how it becomes model-ready.

A ``Dataset``'s sources return raw examples (dicts of numpy values in the data's own
dtype and scale); its ``Features`` say what the pipelines make of each one. The
pipelines themselves know nothing of images or labels: they read, check, prepare
and stack whatever the features describe. ``ImageFeatures`` is the one kind kdq's
loaders produce (one image and one integer label per example); a token sequence,
say, is another class with the same four methods.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol, TypedDict, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


class ImageExample(TypedDict):
    """One raw example of an image classification split.

    Attributes:
        image: Raw pixels, shape (H, W, C), in the dataset's own dtype and scale.
        label: Class index in [0, num_classes).
    """

    image: np.ndarray
    label: int


@runtime_checkable
class Features(Protocol):
    """What the pipelines do with one example, for any kind of data.

    ``train_batches`` and ``eval_batches`` call ``check`` on every raw example they
    read, ``prepare`` on every example they batch (after augmentation) and, for the
    padded tail of an evaluation pass, ``prepare(padding(first_example))``. A batch
    is the examples ``prepare`` returns stacked along a new leading axis.
    """

    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The shape and dtype of each array of one model-ready example."""
        ...

    def check(
        self, example: dict[str, Any], *, split: str, index: int, num_classes: int | None
    ) -> None:
        """Raises a ValueError naming ``split`` and ``index`` if a raw example is invalid.

        ``num_classes`` bounds the example's class indices (labels, tokens); None
        when the bound is unknown.
        """
        ...

    def prepare(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        """Maps a raw example to the numpy arrays ``element_spec`` describes."""
        ...

    def padding(self, example: dict[str, Any]) -> dict[str, Any]:
        """A raw example, shaped like ``example``, that fills an evaluation batch's tail."""
        ...


def check_label(label: Any, num_classes: int | None, *, split: str, index: int) -> int:
    """Checks one example's label as it enters a pipeline.

    Args:
        label: The example's "label" value.
        num_classes: Number of classes, or None to check only that the label is
            a non-negative scalar integer.
        split: Name of the split or source, for the error message.
        index: Index of the example in that split, for the error message.

    Returns:
        The label as a Python int.

    Raises:
        ValueError: If the label is not a scalar integer (a float, a bool, an
            array of shape (1,), a one-hot vector) or lies outside
            [0, num_classes).
    """
    value = np.asarray(label)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(
            f"{split} example {index} has label {label!r} (dtype {value.dtype}, shape "
            f"{value.shape}); a label must be a scalar integer class index. Make the "
            "source return int(label), not a float, a bool, an array of shape (1,) or "
            "a one-hot vector."
        )
    result = int(value)
    if result < 0 or (num_classes is not None and result >= num_classes):
        bound = "" if num_classes is None else f", num_classes={num_classes}"
        raise ValueError(
            f"{split} example {index} has label {result}, outside "
            f"[0, {'num_classes' if num_classes is None else num_classes}){bound}. Fix the "
            "source's labels, or pass the dataset's true number of classes as num_classes."
        )
    return result


def check_mean_std(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> None:
    """Checks per-channel normalisation statistics.

    Args:
        mean: Per-channel means, or None for no normalisation.
        std: Per-channel standard deviations, or None for no normalisation.
        channels: Number of image channels.

    Raises:
        ValueError: If only one of mean and std is given, either has a length
            other than ``channels``, a mean is not finite or a std is not
            positive and finite.
    """
    if mean is None and std is None:
        return
    if mean is None or std is None:
        raise ValueError("mean and std must be given together")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}"
        )
    if not all(math.isfinite(m) for m in mean):
        raise ValueError(f"mean must be finite, got {tuple(mean)}")
    if not all(s > 0 and math.isfinite(s) for s in std):
        raise ValueError(f"std must be positive and finite, got {tuple(std)}")


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """One image and one integer class label per example.

    A raw example is ``{"image": (H, W, C) pixels, "label": class index}``; the
    model-ready one is ``{"image": float32 x, "label": int32}`` with

        x = image / pixel_scale                        (normalize False)
        x = (image / pixel_scale - mean) / std         (normalize True, per channel)

    computed in float32 in that order.

    Attributes:
        shape: (H, W, C) of every model-ready image (the Inception crop resizes
            to H x W).
        pixel_scale: Largest raw pixel value; dividing by it maps pixels to
            [0, 1] (16 for digits, 255 for 8-bit images).
        mean: Per-channel mean of the images scaled to [0, 1]; None (digits,
            arrays without statistics) when unknown.
        std: Per-channel standard deviation matching ``mean``; None exactly when
            ``mean`` is.
        normalize: Whether ``prepare`` standardises with ``mean`` and ``std``;
            ``normalized()`` turns it on.
    """

    shape: tuple[int, int, int]
    pixel_scale: float
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalize: bool = False

    def __post_init__(self):
        shape = tuple(self.shape)
        if len(shape) != 3 or not all(
            isinstance(side, (int, np.integer)) and not isinstance(side, bool) and side > 0
            for side in shape
        ):
            raise ValueError(
                f"shape must be (height, width, channels) of positive integers, got {self.shape!r}"
            )
        if not self.pixel_scale > 0 or not np.isfinite(self.pixel_scale):
            raise ValueError(f"pixel_scale must be positive and finite, got {self.pixel_scale}")
        check_mean_std(self.mean, self.std, shape[2])
        if self.normalize and self.mean is None:
            raise ValueError(
                f"normalize=True needs a per-channel mean and std, but the features of "
                f"images of shape {shape} have none; pass mean= and std= (from_arrays takes "
                "them too), or leave normalisation off"
            )
        # Canonical types, so that equal features compare and hash equal.
        object.__setattr__(self, "shape", tuple(map(int, shape)))
        object.__setattr__(self, "pixel_scale", float(self.pixel_scale))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(map(float, value)))

    def normalized(self) -> ImageFeatures:
        """These features with ``normalize`` on.

        Raises:
            ValueError: If the features have no mean and std.
        """
        return dataclasses.replace(self, normalize=True)

    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """``{"image": float32 (H, W, C), "label": int32 ()}``."""
        return {
            "image": jax.ShapeDtypeStruct(self.shape, jnp.float32),
            "label": jax.ShapeDtypeStruct((), jnp.int32),
        }

    def check(
        self, example: dict[str, Any], *, split: str, index: int, num_classes: int | None
    ) -> None:
        """Checks the label (``check_label``) and that floating-point pixels are finite.

        Raises:
            ValueError: Naming the split, the example's index and the bad value.
        """
        check_label(example["label"], num_classes, split=split, index=index)
        image = np.asarray(example["image"])
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise ValueError(f"{split} example {index} has a NaN or inf pixel; replace or drop it")

    def prepare(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        """The float32 image of the class docstring and the int32 label."""
        image = np.asarray(example["image"], dtype=np.float32) / np.float32(self.pixel_scale)
        if self.normalize:
            image = (image - np.asarray(self.mean, dtype=np.float32)) / np.asarray(
                self.std, dtype=np.float32
            )
        return {"image": image, "label": np.int32(example["label"])}

    def padding(self, example: dict[str, Any]) -> dict[str, Any]:
        """A zero image of the example's shape and dtype, with label 0."""
        return {"image": np.zeros_like(example["image"]), "label": 0}
