"""domain.reports.render_csv: the CSV file a reports.render job writes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tasks_platform.domain.reports import RenderedReport, render_csv


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def render(directory: Path, stem: str = "job-1", **overrides: object) -> RenderedReport:
    options: dict[str, object] = {
        "title": "Monthly sales",
        "columns": ["region", "units", "revenue"],
        "rows": [["north", 3, 12.5], ["south", 0, None]],
        "directory": directory,
        "stem": stem,
    }
    options.update(overrides)
    return render_csv(**options)  # type: ignore[arg-type]


def test_writes_title_line_columns_and_rows(tmp_path: Path) -> None:
    report = render(tmp_path)
    assert report.path == tmp_path / "job-1.csv"
    assert read_rows(report.path) == [
        ["# Monthly sales"],
        ["region", "units", "revenue"],
        ["north", "3", "12.5"],
        ["south", "0", ""],
    ]


def test_reports_row_count_and_file_size(tmp_path: Path) -> None:
    report = render(tmp_path)
    assert report.rows == 2
    assert report.bytes == report.path.stat().st_size > 0


def test_creates_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "reports"
    report = render(directory)
    assert report.path.parent == directory
    assert report.path.is_file()


def test_report_without_rows_has_title_and_columns(tmp_path: Path) -> None:
    report = render(tmp_path, rows=[])
    assert report.rows == 0
    assert read_rows(report.path) == [["# Monthly sales"], ["region", "units", "revenue"]]


def test_commas_quotes_newlines_and_unicode_survive(tmp_path: Path) -> None:
    rows = [['Köln, "Nord"', "line one\nline two", "€"]]
    report = render(tmp_path, title="Q1, résumé", rows=rows)
    assert read_rows(report.path) == [
        ["# Q1, résumé"],
        ["region", "units", "revenue"],
        rows[0],
    ]


@pytest.mark.parametrize(
    ("rows", "number", "cells"),
    [
        ([["a", 1, 2], ["b"]], 2, 1),
        ([["a", 1, 2, 3]], 1, 4),
        ([["a", 1, 2], ["b", 1, 2], []], 3, 0),
    ],
)
def test_row_width_mismatch_is_refused_naming_the_row(
    tmp_path: Path, rows: list[list[object]], number: int, cells: int
) -> None:
    directory = tmp_path / "reports"
    message = f"row {number} has {cells} cells; the report has 3 columns"
    with pytest.raises(ValueError, match=message):
        render(directory, rows=rows)
    assert not directory.exists(), "nothing is written for a refused report"


def test_rerun_with_the_same_stem_overwrites_the_same_file(tmp_path: Path) -> None:
    first = render(tmp_path, rows=[["north", 1, 1.0], ["south", 2, 2.0], ["east", 3, 3.0]])
    second = render(tmp_path, rows=[["west", 4, 4.0]])
    assert second.path == first.path
    assert read_rows(second.path)[2:] == [["west", "4", "4.0"]]
    assert second.bytes == second.path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job-1.csv"], "no partial file left"


def test_rerun_gives_identical_content(tmp_path: Path) -> None:
    first = render(tmp_path).path.read_bytes()
    assert render(tmp_path).path.read_bytes() == first


@pytest.mark.parametrize(
    "stem",
    [
        "../x",
        "../../etc/passwd",
        "/absolute/path",
        "..",
        "a b\\c",
        "sub/dir/name",
        "id;rm -rf ~",
        "",
    ],
)
def test_unsafe_stem_is_sanitised_and_stays_in_the_directory(tmp_path: Path, stem: str) -> None:
    directory = tmp_path / "reports"
    directory.mkdir()
    report = render(directory, stem=stem)
    assert report.path.parent == directory
    assert report.path.resolve().parent == directory.resolve()
    assert report.path.name.endswith(".csv")
    assert "/" not in report.path.name
    assert "\\" not in report.path.name
    assert report.path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"], "nothing escapes"
    assert [p.name for p in directory.iterdir()] == [report.path.name]


def test_safe_stem_is_kept_as_is(tmp_path: Path) -> None:
    stem = "2f1c9e4a-77b1-4c39-9d1e-2a0f7c1b9e55"
    assert render(tmp_path, stem=stem).path.name == f"{stem}.csv"
