"""JobRepository on real PostgreSQL (a fresh schema per test) and on SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import postgres_schema
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tasks_platform.errors import InvalidPayload
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import Base, Job, JobEvent
from tasks_platform.history.repository import JobRepository, as_utc
from tasks_platform.settings import Settings

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty history schema: SQLite in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        made = create_history_engine(Settings(data_dir=tmp_path))
        Base.metadata.create_all(made)
        yield made
        made.dispose()
        return
    with postgres_schema() as url:
        made = create_history_engine(Settings(data_dir=tmp_path, database_url=url))
        Base.metadata.create_all(made)
        yield made
        made.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as opened:
        yield opened


def job(
    job_id: str, *, minutes_ago: float | None = 1, state: str = "succeeded", **columns: Any
) -> Job:
    queued_at = None if minutes_ago is None else NOW - timedelta(minutes=minutes_ago)
    values: dict[str, Any] = {"name": "demo.work", "queue": "default", "updated_at": NOW}
    values.update(columns)
    return Job(id=job_id, state=state, queued_at=queued_at, **values)


def event(job_id: str, state: str, at: datetime, event_id: str | None = None) -> JobEvent:
    return JobEvent(id=event_id or str(uuid.uuid4()), job_id=job_id, state=state, attempt=1, at=at)


def add(session: Session, *rows: Job | JobEvent) -> None:
    session.add_all(rows)
    session.commit()


def ids(jobs: list[Job]) -> list[str]:
    return [row.id for row in jobs]


def test_get_returns_the_job_and_its_events_in_time_then_id_order(session: Session) -> None:
    add(session, job("a"))
    add(
        session,
        event("a", "succeeded", NOW, "e3"),
        event("a", "started", NOW - timedelta(seconds=1), "e2"),
        event("a", "queued", NOW - timedelta(seconds=1), "e1"),
    )
    session.expunge_all()

    found = JobRepository(session).get("a")

    assert found is not None
    row, events = found
    assert row.id == "a"
    assert [e.id for e in events] == ["e1", "e2", "e3"]
    assert JobRepository(session).get("missing") is None


def test_list_filters_by_state_queue_name_tenant_and_queued_time(session: Session) -> None:
    add(
        session,
        job("old", minutes_ago=120),
        job("f1", state="failed", queue="email", name="email.send", tenant="acme"),
        job("d1", state="dead", queue="email", name="email.send", tenant="globex"),
        job("q1", state="queued", queue="ai", name="ai.generate", tenant="acme"),
        job("nil", minutes_ago=None, state="queued"),
    )
    repo = JobRepository(session)

    assert ids(repo.list(states=["failed", "dead"]).items) == ["f1", "d1"]
    assert ids(repo.list(queue="email", tenant="acme").items) == ["f1"]
    assert ids(repo.list(name="ai.generate").items) == ["q1"]
    assert ids(repo.list(states=["queued"]).items) == ["q1", "nil"]  # NULL queued_at last
    assert sorted(ids(repo.list(since=NOW - timedelta(minutes=5)).items)) == ["d1", "f1", "q1"]
    assert ids(repo.list(until=NOW - timedelta(minutes=5)).items) == ["old"]
    assert ids(repo.unsuccessful(tenant="globex").items) == ["d1"]
    assert sorted(ids(repo.unsuccessful().items)) == ["d1", "f1"]


def test_keyset_pages_return_every_row_once_in_order(session: Session) -> None:
    rows = [job(f"j{n:02d}", minutes_ago=n // 3) for n in range(22)]  # ties on queued_at
    rows += [job(f"n{n}", minutes_ago=None) for n in range(3)]  # no queued_at: last
    add(session, *rows)
    by_id_desc = sorted(rows, key=lambda r: r.id, reverse=True)
    newest_first = sorted(by_id_desc, key=_newest_first_nulls_last)  # stable: ties stay id DESC
    expected_ids = [r.id for r in newest_first]
    repo = JobRepository(session)

    seen: list[str] = []
    pages, cursor = 0, None
    while True:
        page = repo.list(limit=10, after=cursor)
        seen += ids(page.items)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
        assert len(page.items) == 10

    assert pages == 3
    assert seen == expected_ids
    assert len(set(seen)) == 25


def _newest_first_nulls_last(row: Job) -> tuple[bool, float]:
    return row.queued_at is None, -(row.queued_at.timestamp() if row.queued_at else 0.0)


def test_a_full_last_page_has_no_cursor(session: Session) -> None:
    add(session, *(job(f"j{n:02d}", minutes_ago=n) for n in range(20)))
    repo = JobRepository(session)

    first = repo.list(limit=10)
    second = repo.list(limit=10, after=first.next_cursor)

    assert ids(first.items) == [f"j{n:02d}" for n in range(10)]
    assert ids(second.items) == [f"j{n:02d}" for n in range(10, 20)]
    assert second.next_cursor is None


def test_pages_follow_the_filters_and_do_not_shift_when_rows_arrive(session: Session) -> None:
    add(session, *(job(f"f{n:02d}", minutes_ago=n, state="failed") for n in range(15)))
    add(session, *(job(f"s{n:02d}", minutes_ago=n) for n in range(15)))
    repo = JobRepository(session)

    first = repo.unsuccessful(limit=10)
    add(session, job("newest", state="failed", minutes_ago=0))  # arrives between two pages
    second = repo.unsuccessful(limit=10, after=first.next_cursor)

    assert ids(first.items) + ids(second.items) == [f"f{n:02d}" for n in range(15)]


@pytest.mark.parametrize("cursor", ["not-a-cursor!", "bm9wZQ", "WyJ4IiwgMV0"])
def test_a_malformed_cursor_is_an_invalid_payload(session: Session, cursor: str) -> None:
    with pytest.raises(InvalidPayload, match="malformed page cursor"):
        JobRepository(session).list(after=cursor)


def test_counts_by_state_optionally_since_a_time(session: Session) -> None:
    add(
        session,
        job("a"),
        job("b"),
        job("c", state="dead"),
        job("old", minutes_ago=60, state="dead"),
        job("q", state="queued", minutes_ago=None),
    )
    repo = JobRepository(session)

    assert repo.counts_by_state() == {"succeeded": 2, "dead": 2, "queued": 1}
    assert repo.counts_by_state(since=NOW - timedelta(minutes=5)) == {"succeeded": 2, "dead": 1}


def test_delete_older_than_removes_ended_jobs_and_their_events(session: Session) -> None:
    long_ago, recently = NOW - timedelta(days=10), NOW - timedelta(hours=1)
    add(
        session,
        job("old-done", finished_at=long_ago, updated_at=long_ago),
        job("old-dead", state="dead", finished_at=long_ago, updated_at=long_ago),
        job("old-cancelled", state="cancelled", updated_at=long_ago),  # never finished
        job("old-stuck", state="started", updated_at=long_ago),  # not terminal: kept
        job("replayed", state="queued", finished_at=long_ago, updated_at=long_ago),  # kept
        job("new-done", finished_at=recently, updated_at=recently),
    )
    add(session, *(event(i, "queued", long_ago) for i in ("old-done", "old-dead", "new-done")))

    deleted = JobRepository(session).delete_older_than(NOW - timedelta(days=7))
    session.commit()

    assert deleted == 3
    assert sorted(session.scalars(select(Job.id)).all()) == ["new-done", "old-stuck", "replayed"]
    assert session.scalars(select(JobEvent.job_id)).all() == ["new-done"]
    assert session.scalar(select(func.count()).select_from(JobEvent)) == 1


def test_the_repository_never_commits(session: Session, engine: Engine) -> None:
    add(session, job("a", finished_at=NOW - timedelta(days=30)))

    assert JobRepository(session).delete_older_than(NOW) == 1
    session.rollback()

    with session_factory(engine)() as other:
        assert other.get(Job, "a") is not None


def test_times_read_back_are_utc_whatever_the_backend(session: Session) -> None:
    add(session, job("a", minutes_ago=0))
    session.expunge_all()
    row = JobRepository(session).list().items[0]
    assert row.queued_at is not None
    assert as_utc(row.queued_at) == NOW
