"""Decoder output to 8-bit images and files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from postdiff.errors import InputError
from postdiff.files import atomic_path


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1], shape (N, C, H, W) -> uint8 (N, H, W, C).

    The same rounding as diffusers' image processor: (x / 2 + 0.5) clipped to [0, 1], times 255,
    rounded half to even.
    """
    unit = np.clip(decoded / 2 + 0.5, 0.0, 1.0)
    return np.round(unit.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # file suffix -> Pillow format


def image_format(path: Path) -> str:
    """The Pillow format ``path``'s suffix asks for; InputError for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise InputError(f"cannot write {path}: '{suffix or 'no suffix'}' is not an image format postdiff writes; "
                         f"end the name in {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def save_image(pixels: np.ndarray, path: Path) -> None:
    """Write one (H, W, C) uint8 image as PNG or JPEG (quality 95) by ``path``'s suffix, atomically."""
    path = Path(path)
    fmt = image_format(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder; name an image file")
    channels = pixels.shape[-1]
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
