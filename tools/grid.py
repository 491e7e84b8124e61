"""Image grids: rows of equally sized images, each row labelled on the left, each column on top."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# PIL's built-in bitmap font: about 6 px per character, 11 px per line (plus spacing).
CHAR_WIDTH, LINE_HEIGHT = 7, 13


def wrap(text: str, chars: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``chars`` characters (longer words are cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= chars:
            lines[-1] += " " + word
        else:
            lines += [word[i:i + chars] for i in range(0, len(word), chars)]
    return lines


def make_grid(rows: list[list[np.ndarray]], labels: list[str], scale: int = 1, pad: int = 2,
              column_labels: list[str] | None = None, corner: str = "") -> Image.Image:
    """Lay out ``rows`` of (H, W, C) uint8 images; ``labels[i]`` is written left of row i (a newline
    in it starts another line) and
    ``column_labels[j]`` (if given) above column j, wrapped to the column's width; ``corner`` above
    the row labels.

    ``scale`` enlarges every image by nearest-neighbour repetition (small models make small images).
    """
    height, width = rows[0][0].shape[:2]
    height, width = height * scale, width * scale
    label_width = 8 + CHAR_WIDTH * max(len(line) for label in labels + [corner] for line in label.split("\n"))
    columns = max(len(row) for row in rows)
    headings = [wrap(text, max(1, width // CHAR_WIDTH)) for text in column_labels or []]
    header = 4 + LINE_HEIGHT * max((len(h) for h in headings), default=0) if headings else 0
    canvas = Image.new("RGB", (label_width + columns * (width + pad), header + len(rows) * (height + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    if headings:
        draw.text((4, header - 4 - LINE_HEIGHT), corner, fill="black")
        for c, lines in enumerate(headings):
            draw.multiline_text((label_width + c * (width + pad), 2), "\n".join(lines), fill="black", spacing=2)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = header + r * (height + pad)
        lines = label.count("\n") + 1
        draw.multiline_text((4, top + height // 2 - 5 - (lines - 1) * LINE_HEIGHT // 2), label, fill="black", spacing=2)
        for c, pixels in enumerate(row):
            image = Image.fromarray(pixels if pixels.shape[-1] == 3 else pixels[..., 0]).convert("RGB")
            image = image.resize((width, height), Image.NEAREST)
            canvas.paste(image, (label_width + c * (width + pad), top))
    return canvas
