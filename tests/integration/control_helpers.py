"""What the control tests share: a platform with a PostgreSQL history, and ways to look at it."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from conftest import Platform, Runs, make_platform, postgres_schema, settled, wait_for
from sqlalchemy.orm import Session

from tasks_platform.control import Control
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import AuditEntry, Base, Job, JobEvent

BROKERS = ["redis", "rabbitmq"]
ACTOR = "test:ana"


@contextmanager
def control_platform(broker: str, tmp_path: Path, **overrides: Any) -> Iterator[Platform]:
    """A platform whose history is a fresh PostgreSQL schema; ``platform.history`` its engine."""
    with postgres_schema() as url, make_platform(broker, tmp_path, database_url=url,
                                                 **overrides) as platform:  # fmt: skip
        engine = create_history_engine(platform.settings)
        Base.metadata.create_all(engine)
        platform.history = engine
        try:
            yield platform
        finally:
            engine.dispose()


def control_of(platform: Platform) -> Control:
    return Control(platform.app, session_factory(platform.history))


def submit(platform: Platform, label: str, runs: Runs, **payload: Any) -> str:
    """A ``demo.work`` job that writes its runs to ``runs``; its id."""
    return str(platform.task("demo.work").delay(label=label, record_to=str(runs.path),
                                                **payload).id)  # fmt: skip


def job_row(platform: Platform, job_id: str) -> Job | None:
    with Session(platform.history) as session:
        return session.get(Job, job_id)


def wait_state(platform: Platform, job_id: str, state: str, timeout: float = 60) -> Job:
    """The job's history row once it is in ``state``."""

    def reached() -> Job | None:
        job = job_row(platform, job_id)
        return job if job is not None and job.state == state else None

    try:
        job: Job = wait_for(reached, timeout, what=f"job {job_id} to be {state}")
    except AssertionError as exc:
        last = job_row(platform, job_id)
        raise AssertionError(f"{exc}; it is {last.state if last else 'not recorded'}") from None
    return job


def event_states(platform: Platform, job_id: str) -> list[str]:
    with Session(platform.history) as session:
        query = sqlalchemy.select(JobEvent.state).where(JobEvent.job_id == job_id)
        return list(session.scalars(query.order_by(JobEvent.at)).all())


def settled_event_states(
    platform: Platform, job_id: str, expected: list[str], timeout: float = 10
) -> list[str]:
    """The job's event states once they are ``expected`` (or after ``timeout``)."""
    states: list[str] = settled(lambda: event_states(platform, job_id),
                                lambda states: states == expected, timeout)  # fmt: skip
    return states


def audit_entries(platform: Platform) -> list[AuditEntry]:
    with Session(platform.history) as session:
        return list(session.scalars(sqlalchemy.select(AuditEntry).order_by(AuditEntry.id)).all())


def queue_depth(control: Control, queue: str) -> int:
    return next(state.depth for state in control.queues() if state.name == queue)


def consumes(platform: Platform, worker: Any, queue: str) -> bool:
    """Whether ``worker`` consumes ``queue`` (a family) right now, by its own account."""
    replies = platform.app.control.inspect(destination=[worker.nodename], timeout=2).active_queues()
    names = {info["name"] for info in (replies or {}).get(worker.nodename, [])}
    return platform.app.topology.queue_name(queue) in names


def insert(platform: Platform, *rows: Any) -> None:
    with Session(platform.history) as session, session.begin():
        session.add_all(rows)


def stop_together(*workers: Any) -> None:
    """Stop workers at once rather than one after the other (each takes seconds)."""
    for worker in workers:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()
