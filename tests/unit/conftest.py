"""Unit tests: no broker, no database, no worker; nothing read from the caller's environment."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

PLATFORM_PREFIX = "TASKS_"


def _platform_variables() -> list[str]:
    return [name for name in os.environ if name.startswith(PLATFORM_PREFIX)]


# Importing ``tasks_platform`` builds the default app from TASKS_* variables and creates the
# embedded broker folders under its data directory. Build it here, before any test module
# imports the package, with no TASKS_* variable set and a throw-away data directory, so that
# collecting the unit tests neither depends on nor writes to the caller's environment.
_IMPORT_DATA_DIR = tempfile.mkdtemp(prefix="tasks-platform-unit-")
with pytest.MonkeyPatch.context() as _patch:
    for _name in _platform_variables():
        _patch.delenv(_name)
    _patch.setenv("TASKS_DATA_DIR", _IMPORT_DATA_DIR)
    import tasks_platform  # noqa: F401 - registers the job families on every app


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_IMPORT_DATA_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _hermetic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TASKS_* variable of the caller leaks into a test."""
    for name in _platform_variables():
        monkeypatch.delenv(name)
