"""Aligned text tables for human output (numbers right-aligned, text left-aligned)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[object], rows: Sequence[Sequence[object]], *,
                 footer: Sequence[object] | None = None) -> str:  # fmt: skip
    """Render ``header``, ``rows`` and an optional ``footer`` as aligned columns."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    if footer is not None:
        cells.append([str(c) for c in footer])
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    numeric = [
        all(_is_number(row[c]) for row in cells[1:] if row[c] not in ("", "-"))
        for c in range(len(header))
    ]
    rule = "  ".join("-" * w for w in widths)
    lines = []
    for number, row in enumerate(cells):
        if number == 1 or (footer is not None and number == len(cells) - 1):
            lines.append(rule)
        lines.append(
            "  ".join(
                cell.rjust(w) if numeric[c] else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
