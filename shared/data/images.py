"""Decoding an image file to RGB, with a typed error naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.data.errors import MissingInputError, UnreadableImageError


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without losing the picture.

    Alpha is composited onto black (the background of a scan) rather than
    dropped, and high bit-depth grayscale is rescaled to its own range instead
    of being clipped at 255, which would turn most 16-bit scans white.
    """
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path | str) -> Image.Image:
    """Decode an image fully and return it as RGB.

    Decoding is forced here (PIL is lazy) so that a truncated or corrupt file
    fails with :class:`UnreadableImageError` naming it, at load time, instead
    of as an obscure error deep inside a training loop.
    """
    return decode_image(path)


def decode_image(path: Path | str, *, keep_gray: bool = False) -> Image.Image:
    """:func:`load_image`, except that with ``keep_gray`` an 8-bit grayscale file stays ``L``.

    An ``L`` image is an RGB one with three equal channels; the encoder's fast preprocessing
    (:mod:`shared.data.preprocess`) spreads it over the channels itself, which saves the
    conversion and two thirds of the bytes.
    """
    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"image file {p} does not exist")
    if not p.is_file():
        raise UnreadableImageError(f"{p} is not a regular file")
    try:
        with Image.open(p) as img:
            img.load()
            if keep_gray and img.mode == "L":
                return img.copy()
            return _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(f"cannot decode image {p}: {exc}") from exc
