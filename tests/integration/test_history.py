"""Every job's life on record in PostgreSQL, written by real workers on both brokers."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy
from conftest import POSTGRES_URL, Platform, make_platform, postgres_schema, wait_for
from sqlalchemy.orm import Session
from tcp_proxy import TcpProxy

from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import TERMINAL_STATES, Base, Job, JobEvent
from tasks_platform.process import process_name

BROKERS = ["redis", "rabbitmq"]


@contextmanager
def history_platform(
    broker: str, tmp_path: Path, *, via_port: int | None = None, **overrides: Any
) -> Iterator[Platform]:
    """A platform whose history is a fresh PostgreSQL schema (reached through ``via_port``)."""
    with postgres_schema() as url:
        target = urlsplit(url)
        reached = url if via_port is None else url.replace(target.netloc.split("@")[-1],
                                                           f"127.0.0.1:{via_port}")  # fmt: skip
        with make_platform(broker, tmp_path, database_url=reached, **overrides) as platform:
            engine = create_history_engine(
                platform.settings.model_copy(update={"database_url": url})
            )
            Base.metadata.create_all(engine)
            platform.history = engine
            try:
                yield platform
            finally:
                engine.dispose()


def _session(platform: Platform) -> Session:
    """A session on the test's own engine (the direct URL, even when workers use a proxy)."""
    assert platform.history is not None
    return Session(platform.history)


def _job(platform: Platform, job_id: str) -> tuple[Job | None, list[JobEvent]]:
    with _session(platform) as session:
        # events first: each statement sees what was committed when it ran, and the writer
        # commits a row with its events, so the row read next is at least as new as they are
        events = list(session.scalars(
            sqlalchemy.select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.at)
        ))  # fmt: skip
        job = session.get(Job, job_id)
        return job, events


def _states(events: list[JobEvent]) -> list[tuple[str, int]]:
    return [(e.state, e.attempt) for e in events]


def _recorded(platform: Platform, job_id: str, expected: list[tuple[str, int]]) -> Any:
    """The job and its events once exactly ``expected`` transitions are on record.

    Producer, worker and pool processes flush on their own, so a terminal row may be written
    before an earlier transition of another process arrives; it is the order by time that counts.
    """
    seen: list[tuple[str, int]] = []

    def ready() -> Any:
        nonlocal seen
        job, events = _job(platform, job_id)
        seen = _states(events)
        return (job, events) if job is not None and seen == expected else None

    try:
        return wait_for(ready, 60, what=f"job {job_id} to have {expected} on record")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; on record: {seen}") from None


@pytest.mark.parametrize("broker", BROKERS)
def test_job_retried_twice_then_succeeding_has_every_transition_in_order(
    broker: str, tmp_path: Path
) -> None:
    with history_platform(broker, tmp_path) as platform:
        platform.worker()
        job_id = platform.task("demo.work").delay(label="flaky", fail_times=2).id

        job, events = _recorded(platform, job_id, [
            ("queued", 1), ("started", 1), ("retrying", 1), ("started", 2),
            ("retrying", 2), ("started", 3), ("succeeded", 3),
        ])  # fmt: skip
        time.sleep(0.5)  # nothing more arrives later
        assert _states(_job(platform, job_id)[1]) == _states(events)
        assert job is not None
        assert (job.state, job.attempts, job.name, job.queue) == (
            "succeeded",
            3,
            "demo.work",
            "default",
        )
        assert job.priority == "normal"
        assert job.max_retries == 3
        assert job.kwargs is not None
        assert job.kwargs["label"] == "flaky"
        assert job.result == {"label": "flaky", "attempt": 3}
        assert job.error_type is None
        assert job.queued_at <= job.started_at <= job.finished_at
        assert job.wait_seconds is not None
        assert 0 <= job.wait_seconds < 10
        assert job.run_seconds is not None
        assert job.run_seconds >= 0
        retrying = [e for e in events if e.state == "retrying"]
        assert retrying[1].at - retrying[0].at > (retrying[0].at - events[0].at) * 0  # ordered


@pytest.mark.parametrize("broker", BROKERS)
def test_job_ending_dead_is_recorded_failed_then_dead_with_its_reason(
    broker: str, tmp_path: Path
) -> None:
    with history_platform(broker, tmp_path) as platform:
        platform.worker()
        job_id = platform.task("demo.send_email").delay(label="bounce", fail_permanently=True).id

        job, events = _recorded(
            platform, job_id, [("queued", 1), ("started", 1), ("failed", 1), ("dead", 1)]
        )

        assert job.state == "dead"
        assert job.dead_reason == "permanent_error"
        assert job.error_type == "SimulatedRejection"
        assert "rejected for good" in job.error_message
        assert "SimulatedRejection" in job.error_traceback
        assert job.queue == "email"
        assert [e.at for e in events] == sorted(e.at for e in events)
        assert job.queued_at <= job.started_at <= job.finished_at
        assert job.finished_at >= events[-2].at  # finished when it failed, not when dead-lettered


@pytest.mark.parametrize("broker", BROKERS)
def test_job_cancelled_while_queued_never_runs_and_is_recorded_cancelled(
    broker: str, tmp_path: Path
) -> None:
    with history_platform(broker, tmp_path) as platform:
        runs = platform.runs()
        worker = platform.worker()
        job_id = (
            platform.task("demo.work")
            .apply_async(kwargs={"label": "never", "record_to": str(runs.path)}, countdown=3)
            .id
        )
        platform.app.control.revoke(job_id, destination=[worker.nodename])

        job, events = _recorded(platform, job_id, [("queued", 1), ("cancelled", 1)])

        assert job.state == "cancelled"
        assert job.started_at is None
        assert job.queued_at <= events[-1].at
        time.sleep(3.5)
        assert runs.starts() == []


@pytest.mark.parametrize("broker", BROKERS)
def test_thousand_jobs_on_two_workers_give_a_thousand_terminal_rows(
    broker: str, tmp_path: Path
) -> None:
    with history_platform(broker, tmp_path) as platform:
        platform.worker(concurrency=2)
        task = platform.task("demo.work")
        ids = {task.delay(label=f"j{i}").id for i in range(1000)}

        def all_terminal() -> bool:
            with _session(platform) as session:
                rows = session.execute(sqlalchemy.select(Job.id, Job.state)).all()
            return len(rows) == 1000 and all(state == "succeeded" for _, state in rows)

        # the producer flushes its `queued` transitions on its own, up to a second later
        wait_for(lambda: all_terminal() and _count_events(platform.history) >= 3000, 120,
                 what="1,000 succeeded rows and their events", interval=0.5)  # fmt: skip
        with _session(platform) as session:
            assert set(session.scalars(sqlalchemy.select(Job.id))) == ids
            per_job = session.execute(
                sqlalchemy.select(JobEvent.job_id, JobEvent.state, sqlalchemy.func.count())
                .group_by(JobEvent.job_id, JobEvent.state)
            ).all()  # fmt: skip
        assert all(count == 1 for _, _, count in per_job)  # no transition written twice
        assert len(per_job) == 3000  # queued, started, succeeded each


def test_the_throughput_profile_runs_each_job_once_and_records_it(tmp_path: Path) -> None:
    """Two solo workers with 32 jobs each in flight take jobs in batches from Redis (one round
    trip per batch): every job runs once, and the history has every one of them."""
    with history_platform("redis", tmp_path, prefetch_multiplier=32, task_events=False) as platform:
        runs = platform.runs()
        task = platform.task("demo.work")
        ids = {task.delay(label=f"j{i}", record_to=str(runs.path)).id for i in range(600)}
        for _ in range(2):  # started on a full queue: batches from the first fetch
            platform.worker(pool="solo", concurrency=1, queues=["default"])

        def all_succeeded() -> bool:
            with _session(platform) as session:
                states = session.execute(sqlalchemy.select(Job.id, Job.state)).all()
            return len(states) == 600 and all(state == "succeeded" for _, state in states)

        wait_for(all_succeeded, 120, what="600 succeeded rows", interval=0.5)
        labels = [line[0] for line in runs.dones()]
        assert sorted(labels) == sorted(f"j{i}" for i in range(600))  # each ran once
        with _session(platform) as session:
            assert set(session.scalars(sqlalchemy.select(Job.id))) == ids


def test_the_writer_of_a_killed_worker_writes_what_it_was_given_and_ends(tmp_path: Path) -> None:
    """The history writer process is a fork of the worker's main process: when that process is
    SIGKILLed (its pool processes end with it), the writer writes what the segments hold and
    ends; it is no process of a dead worker left running."""
    with history_platform("redis", tmp_path) as platform:
        worker = platform.worker(concurrency=1)
        assert worker.process is not None
        writers = worker.writer_pids()
        assert len(writers) == 1, f"one history writer among the worker's children {writers}"
        runs = platform.runs()
        job = platform.task("demo.work").delay(label="last", record_to=str(runs.path))
        wait_for(lambda: runs.dones("last"), 60, what="the job to succeed")

        os.kill(worker.pid, signal.SIGKILL)  # the main process only, at once
        worker.process.wait(10)

        wait_for(lambda: process_name(writers[0]) is None, 30, what="the writer process to end")
        found, events = _job(platform, job.id)
        assert found is not None
        assert found.state == "succeeded"
        assert [state for state, _ in _states(events)][-2:] == ["started", "succeeded"]


def test_database_outage_loses_no_history(tmp_path: Path) -> None:
    target = urlsplit(POSTGRES_URL.replace("postgresql+psycopg", "postgresql"))
    proxy = TcpProxy((target.hostname or "127.0.0.1", target.port or 5432)).start()
    # a small buffer, so that the outage also goes through the on-disk journal
    with history_platform(
        "redis", tmp_path, via_port=proxy.port, history_buffer_max=100
    ) as platform:
        engine = platform.history
        platform.worker(concurrency=2)
        task = platform.task("demo.work")
        first = [task.delay(label=f"a{i}").id for i in range(100)]
        wait_for(lambda: _count(engine, terminal=True) == 100, 60, what="the first jobs on record")

        proxy.cut()  # the database is gone for producers and workers alike
        runs = platform.runs()
        during = [task.delay(label=f"b{i}", record_to=str(runs.path)).id for i in range(400)]
        wait_for(lambda: len(runs.dones()) == 400, 120, what="jobs to run during the outage")
        assert _count(engine) == 100  # nothing could be written meanwhile
        assert list((platform.settings.data_dir / "journal").glob("*.jsonl"))  # spilled to disk

        proxy.start()
        wait_for(
            lambda: _count(engine, terminal=True) == 500 and _count_events(engine) == 1500,
            120,
            what="history to catch up (producer and workers flush on their own)",
        )
        with Session(engine) as session:
            rows = {j.id: j for j in session.scalars(sqlalchemy.select(Job))}
            events = session.scalar(
                sqlalchemy.select(sqlalchemy.func.count()).select_from(JobEvent)
            )
        assert set(rows) == set(first) | set(during)
        assert {j.state for j in rows.values()} == {"succeeded"}
        assert all(j.queued_at and j.started_at and j.finished_at for j in rows.values())
        assert events == 1500
    proxy.cut()


def _count_events(engine: sqlalchemy.Engine) -> int:
    query = sqlalchemy.select(sqlalchemy.func.count()).select_from(JobEvent)
    with engine.connect() as connection:
        return int(connection.scalar(query) or 0)


def _count(engine: sqlalchemy.Engine, *, terminal: bool = False) -> int:
    query = sqlalchemy.select(sqlalchemy.func.count()).select_from(Job)
    if terminal:
        query = query.where(Job.state.in_([s.value for s in TERMINAL_STATES]))
    with engine.connect() as connection:
        return int(connection.scalar(query) or 0)


def test_secrets_in_a_payload_never_reach_the_history_tables(tmp_path: Path) -> None:
    with history_platform("redis", tmp_path) as platform:
        platform.worker()
        job_id = platform.task("demo.sync_account").delay(
            account="acme", password="hunter2-PASSWORD", api_key="sk-live-APIKEY",
            phone="+44-7700-PHONE", options={"auth_token": "tok-OPTION", "region": "eu"},
        ).id  # fmt: skip

        job, _ = _recorded(platform, job_id, [("queued", 1), ("started", 1), ("succeeded", 1)])

        assert job.kwargs["account"] == "acme"
        assert job.kwargs["options"]["region"] == "eu"
        with _session(platform) as session:
            raw = json.dumps([
                [str(v) for v in row]
                for table in ("jobs", "job_events")
                for row in session.execute(sqlalchemy.text(f"SELECT * FROM {table}")).all()
            ])  # fmt: skip
        for secret in ("hunter2-PASSWORD", "sk-live-APIKEY", "+44-7700-PHONE", "tok-OPTION",
                       "tok-acme-issued"):  # fmt: skip
            assert secret not in raw
        assert "[redacted]" in raw
