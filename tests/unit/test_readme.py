"""The README documents what the code has."""

from __future__ import annotations

from pathlib import Path

from tasks_platform.settings import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_documents_every_setting() -> None:
    missing = [
        f"TASKS_{n.upper()}" for n in Settings.model_fields if f"`TASKS_{n.upper()}`" not in README
    ]
    assert missing == []


def test_readme_quick_start_names_the_two_commands() -> None:
    assert "make demo" in README
    assert "make test" in README


def test_ci_runs_the_readme_test_command() -> None:
    ci = (Path(__file__).parents[2] / ".ci" / "run").read_text()
    assert "make test" in ci
