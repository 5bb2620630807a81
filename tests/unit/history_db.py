"""A SQLite history database for the writer's unit tests, and two helpers to use it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
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
    made = create_history_engine(Settings(data_dir=tmp_path))
    Base.metadata.create_all(made)
    yield made
    made.dispose()


def write(engine: Engine, *transitions: Transition) -> None:
    with Session(engine) as session, session.begin():
        apply_transitions(session, transitions)


def row(engine: Engine, job_id: str = "j") -> Job:
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job
