"""Fixed-width console tables: every column as wide as its widest cell, two spaces between columns,
whatever the cell lengths (a long category name never runs into the next column)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMN_GAP = "  "


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align_right: Sequence[bool] | None = None) -> str:
    """``headers`` and ``rows`` (cells turned into ``str``) as aligned text lines, a rule under the
    header. ``align_right[i]``: right-align column i (numbers); default left. Rows shorter than the
    header are padded with empty cells; longer ones are an error."""
    width = len(headers)
    cells = [[str(h) for h in headers]]
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"format_table: row {i} has {len(row)} cells for {width} columns")
        cells.append([str(c) for c in row] + [""] * (width - len(row)))
    right = list(align_right or [False] * width)
    widths = [max(len(r[c]) for r in cells) for c in range(width)]

    def line(r: list[str]) -> str:
        return COLUMN_GAP.join(v.rjust(w) if right[c] else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), COLUMN_GAP.join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
