"""Image grids: rows of equally sized images, each row labelled on the left."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def make_grid(rows: list[list[np.ndarray]], labels: list[str], scale: int = 1, pad: int = 2) -> Image.Image:
    """Lay out ``rows`` of (H, W, C) uint8 images; ``labels[i]`` is written left of row i.

    ``scale`` enlarges every image by nearest-neighbour repetition (small models make small images).
    """
    height, width = rows[0][0].shape[:2]
    height, width = height * scale, width * scale
    label_width = 8 + 7 * max(len(label) for label in labels)
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (label_width + columns * (width + pad), len(rows) * (height + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = r * (height + pad)
        draw.text((4, top + height // 2 - 5), label, fill="black")
        for c, pixels in enumerate(row):
            image = Image.fromarray(pixels if pixels.shape[-1] == 3 else pixels[..., 0]).convert("RGB")
            image = image.resize((width, height), Image.NEAREST)
            canvas.paste(image, (label_width + c * (width + pad), top))
    return canvas
