"""Image grids label their rows and columns."""

from __future__ import annotations

import numpy as np

from postdiff.tools.grid import LINE_HEIGHT, wrap, make_grid


def _dark(region: np.ndarray) -> int:
    return int((region.min(axis=-1) < 128).sum())


def testwrap_breaks_at_spaces_and_cuts_long_words() -> None:
    assert wrap('"digit 7", seed 12', 10) == ['"digit 7",', "seed 12"]
    assert wrap("abcdefghij", 4) == ["abcd", "efgh", "ij"]


def test_grid_writes_a_heading_over_every_column_and_a_label_left_of_every_row() -> None:
    image = np.full((16, 16, 3), 255, dtype=np.uint8)  # white images: any dark pixel is text
    rows = [[image] * 3, [image] * 3]
    plain = np.asarray(make_grid(rows, ["a", "b"], scale=2))
    labelled = np.asarray(make_grid(rows, ["a", "b"], scale=2, column_labels=["x", "y", "z"], corner="c"))
    header = labelled.shape[0] - plain.shape[0]
    assert header >= LINE_HEIGHT and labelled.shape[1] == plain.shape[1]
    label_width = plain.shape[1] - 3 * (32 + 2)
    for c in range(3):  # each column's heading has ink above that column
        left = label_width + c * 34
        assert _dark(labelled[:header, left:left + 32]) > 0
    assert _dark(labelled[:header, :label_width]) > 0  # the corner
    for r in range(2):  # each row label has ink left of its row
        top = header + r * 34
        assert _dark(labelled[top:top + 32, :label_width]) > 0
    assert _dark(labelled[header:, label_width:]) == 0  # the images themselves stay untouched


def test_a_row_label_spans_lines_at_a_newline() -> None:
    image = np.full((16, 16, 3), 255, dtype=np.uint8)
    one = np.asarray(make_grid([[image]], ["abcdef"], scale=3))
    two = np.asarray(make_grid([[image]], ["abcdef\nabc"], scale=3))
    assert two.shape == one.shape  # the label column is as wide as its longest line
    label_width = one.shape[1] - (48 + 2)

    def inked_rows(grid: np.ndarray) -> np.ndarray:
        return np.flatnonzero((grid[:, :label_width].min(axis=-1) < 128).any(axis=1))

    first, second = inked_rows(one), inked_rows(two)
    assert second.max() - second.min() >= first.max() - first.min() + LINE_HEIGHT - 2  # a second line of text
