"""Fast preprocessing for encoding: the backbone's own transform, split into a PIL stage and a lookup.

A CLIP-style transform is ``Compose([Resize, CenterCrop, (ConvertMode), ToTensor, Normalize])``.
Applied image by image, ``ToTensor`` + ``Normalize`` cost several times the JPEG decode (about
5 ms an image on a 2-core CPU, more than a tenth of the forward pass). Both are a function of one
byte and its channel, ``((v / 255) - mean[c]) / std[c]`` in float32, so :class:`ArrayPreprocess`
computes the 3 x 256 possible values once and fills a batch with one gather per channel: the
same float32 operations in the same order, hence **bit-identical** tensors, at a fraction of the cost.
The resize and crop stay PIL's, exactly as configured. A grayscale file is kept as one 8-bit plane
and spread over the three channels by the gather (PIL resizes each channel alike, so this too is
what its RGB copy would give).

:meth:`ArrayPreprocess.from_transform` returns None for a transform of any other shape; the caller
then falls back to calling the transform image by image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data.images import decode_image

# transforms that treat an 8-bit grayscale image exactly like its RGB copy, channel by channel
_MODE_AGNOSTIC = ("Resize", "CenterCrop")


@dataclass(frozen=True)
class ArrayPreprocess:
    """A PIL stage per image, then float32 [B, 3, H, W] batches from a per-channel lookup table."""

    pil_stage: tuple[Callable, ...]  # resize, crop: PIL in, PIL out
    lut: np.ndarray  # float32 [3, 256]: the normalised value of each byte in each channel
    keep_gray: bool  # every PIL step treats an L image like its RGB copy

    @classmethod
    def from_transform(cls, transform: Callable) -> ArrayPreprocess | None:
        """Split ``Compose([PIL steps..., ToTensor, Normalize])``; None for any other transform."""
        steps = list(getattr(transform, "transforms", ()))
        if len(steps) < 2:
            return None
        to_tensor, normalize = steps[-2], steps[-1]
        if type(to_tensor).__name__ not in ("ToTensor", "MaybeToTensor") or type(normalize).__name__ != "Normalize":
            return None
        mean = np.asarray(normalize.mean, dtype=np.float32).reshape(-1)
        std = np.asarray(normalize.std, dtype=np.float32).reshape(-1)
        if mean.size == 1:
            mean, std = np.repeat(mean, 3), np.repeat(std, 3)
        if mean.size != 3 or std.size != 3:
            return None
        pil_stage = []
        keep_gray = True
        for step in steps[:-2]:
            name = type(step).__name__
            if name == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB":
                continue  # decode_image gives RGB, or L that the lookup spreads over three channels
            if name not in _MODE_AGNOSTIC:
                keep_gray = False
            pil_stage.append(step)
        # exactly torchvision's arithmetic: to_tensor's float32 division by 255, then Normalize's
        # float32 subtraction of the mean and division by the standard deviation
        values = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255)
        lut = np.stack([(values - mean[c]) / std[c] for c in range(3)]).astype(np.float32)
        return cls(tuple(pil_stage), lut, keep_gray)

    def load(self, path: Path | str) -> np.ndarray:
        """One image file through decoding and the PIL stage: uint8 [H, W] (grayscale) or [H, W, 3]."""
        image = decode_image(path, keep_gray=self.keep_gray)
        for step in self.pil_stage:
            image = step(image)
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        return np.asarray(image)

    def batch(self, images: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """float32 [B, 3, H, W] from the arrays of :meth:`load` (all one size, as the crop makes them)."""
        if not images:
            raise ValueError("no images")
        height, width = images[0].shape[:2]
        if out is None:
            out = np.empty((len(images), 3, height, width), dtype=np.float32)
        for i, pixels in enumerate(images):
            if pixels.shape[:2] != (height, width):
                raise ValueError(f"image {i} is {pixels.shape[:2]} after preprocessing, the batch {(height, width)}")
            for c in range(3):
                plane = pixels if pixels.ndim == 2 else pixels[:, :, c]
                np.take(self.lut[c], plane, out=out[i, c])
        return out

    def __call__(self, paths: Sequence[Path | str]) -> np.ndarray:
        """float32 [B, 3, H, W] for image files, equal to stacking the transform's tensors."""
        return self.batch([self.load(p) for p in paths])
