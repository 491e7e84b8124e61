"""Decoder output to 8-bit images and files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from postdiff.files import atomic_path


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1], shape (N, C, H, W) -> uint8 (N, H, W, C).

    The same rounding as diffusers' image processor: (x / 2 + 0.5) clipped to [0, 1], times 255,
    rounded half to even.
    """
    unit = np.clip(decoded / 2 + 0.5, 0.0, 1.0)
    return np.round(unit.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write one (H, W, C) uint8 image as PNG, atomically (a temp file renamed into place)."""
    channels = pixels.shape[-1]
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
