"""A history database for the writer's unit tests (SQLite; the writer's own tests run on
PostgreSQL too, whose statements differ), and two helpers to use it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import postgres_schema
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import Base, Job
from tasks_platform.history.writer import Transition, apply_transitions
from tasks_platform.settings import Settings

T0 = 1_700_000_000.0


@pytest.fixture(name="engine")
def engine_fixture(tmp_path: Path) -> Iterator[Engine]:
    """A fresh SQLite history (import this into a test module to use ``engine``)."""
    with _history(Settings(data_dir=tmp_path)) as made:
        yield made


@pytest.fixture(name="engine", params=["sqlite", "postgres"])
def both_engines_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A fresh history on SQLite and on PostgreSQL (a schema of its own)."""
    if request.param == "sqlite":
        with _history(Settings(data_dir=tmp_path)) as made:
            yield made
        return
    with postgres_schema() as url, _history(Settings(data_dir=tmp_path, database_url=url)) as made:
        yield made


@contextmanager
def _history(settings: Settings) -> Iterator[Engine]:
    made = create_history_engine(settings)
    Base.metadata.create_all(made)
    try:
        yield made
    finally:
        made.dispose()


def write(engine: Engine, *transitions: Transition) -> None:
    with Session(engine) as session, session.begin():
        apply_transitions(session, transitions)


def row(engine: Engine, job_id: str = "j") -> Job:
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job
