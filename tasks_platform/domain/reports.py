"""Rendering tabular reports to CSV files."""

from __future__ import annotations

import csv
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class RenderedReport:
    path: Path
    rows: int
    bytes: int


def render_csv(
    *, title: str, columns: list[str], rows: list[list[object]], directory: Path, stem: str
) -> RenderedReport:
    """Write ``rows`` under ``columns`` to ``directory/<stem>.csv`` atomically.

    A rerun of the same job (same ``stem``) overwrites the same file, so redelivery is harmless.
    """
    width = len(columns)
    for number, row in enumerate(rows, start=1):
        if len(row) != width:
            raise ValueError(f"row {number} has {len(row)} cells; the report has {width} columns")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{_SAFE.sub('_', stem)}.csv"
    partial = target.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"# {title}"])
        writer.writerow(columns)
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(target)
    return RenderedReport(path=target, rows=len(rows), bytes=target.stat().st_size)
