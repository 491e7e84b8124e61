"""Bilinear resizing of latents in numpy, matching ``torch.nn.functional.interpolate(...,
mode="bilinear", align_corners=False, antialias=False)``."""

from __future__ import annotations

import numpy as np


def _axis_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and the weight of hi for each output position along one axis.

    Half-pixel centres: src = (dst + 0.5) * in / out - 0.5, clamped at 0 (torch's
    ``area_pixel_compute_source_index`` for align_corners=False).
    """
    scale = np.float32(size_in) / np.float32(size_out)
    src = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (N, C, h, w) float32 ``x`` to (N, C, height, width)."""
    y0, y1, wy = _axis_weights(x.shape[2], height)
    x0, x1, wx = _axis_weights(x.shape[3], width)
    wy, wx = wy[:, None], wx[None, :]
    top = x[:, :, y0][:, :, :, x0] * (1 - wx) + x[:, :, y0][:, :, :, x1] * wx
    bottom = x[:, :, y1][:, :, :, x0] * (1 - wx) + x[:, :, y1][:, :, :, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)
