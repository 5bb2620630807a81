"""Stats and health against real brokers, workers and history databases."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    RABBITMQ_URL,
    Platform,
    make_platform,
    postgres_schema,
    require_service,
    wait_for,
)
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform import create_app
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import Base, Job, JobEvent
from tasks_platform.settings import Settings
from tasks_platform.stats import Level, Snapshot, Stats, evaluate, exposition
from tasks_platform.stats.broker import queue_depths
from tasks_platform.stats.history import window_figures
from tasks_platform.topology import QUEUES

NOW = datetime.now(UTC).replace(microsecond=0)
WINDOW = timedelta(minutes=15)


@contextmanager
def history(kind: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on an empty history: SQLite under tmp_path, or a fresh PostgreSQL schema."""
    if kind == "sqlite":
        engine = create_history_engine(Settings(data_dir=tmp_path / "history"))
        try:
            yield _created(engine)
        finally:
            engine.dispose()
        return
    with postgres_schema() as url:
        engine = create_history_engine(Settings(data_dir=tmp_path, database_url=url))
        try:
            yield _created(engine)
        finally:
            engine.dispose()


def _created(engine: Engine) -> sessionmaker[Session]:
    Base.metadata.create_all(engine)
    return session_factory(engine)


def insert_workload(sessions: sessionmaker[Session]) -> None:
    """100 demo.work jobs in the window (90 succeed, 10 die, 20 retries), 5 reports, old noise.

    Job n of demo.work waited n/10 seconds and ran n seconds (n = 1..100). demo.work runs on
    the default queue, reports.render on reports; every job's first event is ``queued``.
    """
    rows: list[Job | JobEvent] = []
    for n in range(1, 101):
        at = NOW - timedelta(minutes=10, seconds=-n)
        outcome = ["failed", "dead"] if n <= 10 else ["succeeded"]
        rows += _job(
            f"w{n:03d}",
            "demo.work",
            at,
            wait=n / 10,
            run=float(n),
            states=["queued"] + (["retrying"] if n % 5 == 0 else []) + outcome,
        )
    for n in range(5):
        rows += _job(
            f"r{n}",
            "reports.render",
            NOW - timedelta(minutes=1),
            wait=0.5,
            run=2.0,
            states=["queued", "succeeded"],
        )
    for n in range(7):  # before the window: never counted
        rows += _job(
            f"old{n}", "demo.work", NOW - timedelta(hours=2), wait=500, run=500, states=["dead"]
        )
    with sessions() as session:
        session.add_all(rows)
        session.commit()


def _job(
    job_id: str, name: str, at: datetime, *, wait: float, run: float, states: list[str]
) -> list[Job | JobEvent]:
    finished = states[-1] in ("succeeded", "dead")
    row = Job(
        id=job_id,
        name=name,
        queue="reports" if name == "reports.render" else "default",
        state=states[-1],
        updated_at=at,
        queued_at=at - timedelta(seconds=wait + run),
        started_at=at - timedelta(seconds=run),
        finished_at=at if finished else None,
        wait_seconds=wait,
        run_seconds=run,
    )
    events: list[Job | JobEvent] = [
        JobEvent(id=str(uuid.uuid4()), job_id=job_id, state=state, attempt=1, at=at)
        for state in states
    ]
    return [row, *events]


# -- history figures -------------------------------------------------------------------------
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_window_figures_per_queue_count_submissions_outcomes_and_times(
    database: str, tmp_path: Path
) -> None:
    with history(database, tmp_path) as sessions:
        insert_workload(sessions)
        with sessions() as session:
            window = window_figures(session, since=NOW - WINDOW, until=NOW, by=Job.queue)

    assert [f.job for f in window.jobs] == ["default", "reports"]
    default, reports = window.jobs
    assert (default.queued, default.succeeded, default.retrying, default.dead) == (100, 90, 20, 10)
    assert (default.finished, default.run.p50) == (100, pytest.approx(50.5))
    assert (reports.queued, reports.succeeded, reports.finished, reports.wait.p50) == (5, 5, 5, 0.5)
    assert window.total.queued == 105


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_window_figures_of_a_known_workload(database: str, tmp_path: Path) -> None:
    with (
        make_platform("embedded", tmp_path, history_enabled=False) as platform,
        history(database, tmp_path) as sessions,
    ):
        insert_workload(sessions)

        window = Stats(platform.app, sessions).snapshot(window=WINDOW, now=NOW).window

    assert window is not None
    assert [f.job for f in window.jobs] == ["demo.work", "reports.render"]
    work, reports = window.jobs
    assert (work.succeeded, work.failed, work.dead, work.retrying) == (90, 10, 10, 20)
    assert work.unsuccessful == 10
    assert work.finished == 100
    assert work.per_minute == pytest.approx(100 / 15)
    assert work.success_rate == pytest.approx(0.9)
    assert work.failure_rate == pytest.approx(0.1)
    assert work.retry_rate == pytest.approx(20 / 120)
    assert work.run.p50 == pytest.approx(50.5)
    assert work.run.p95 == pytest.approx(95.05)
    assert work.run.p99 == pytest.approx(99.01)
    assert work.wait.p50 == pytest.approx(5.05)
    assert (reports.succeeded, reports.finished, reports.run.p50) == (5, 5, 2.0)
    assert window.total.finished == 105
    assert (work.queued, reports.queued) == (100, 5)
    assert window.total.succeeded == 95
    assert window.total.run.count == 105


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_more_than_ten_dead_jobs_in_the_window_warn(database: str, tmp_path: Path) -> None:
    with (
        make_platform("embedded", tmp_path, history_enabled=False) as platform,
        history(database, tmp_path) as sessions,
    ):
        insert_workload(sessions)
        with sessions() as session:
            session.add_all(_job("w-extra", "demo.work", NOW, wait=1, run=1, states=["dead"]))
            session.commit()

        verdict = Stats(platform.app, sessions).health(window=WINDOW, now=NOW)

    assert verdict.level is Level.WARNING
    assert [(a.rule, a.subject, a.value) for a in verdict.alerts] == [
        ("unsuccessful_jobs", "demo.work", 11)
    ]


# -- broker figures ----------------------------------------------------------------------------
def _publish(platform: Platform, plan: dict[tuple[str, str], int]) -> None:
    """Publish ``count`` demo jobs per (job name, priority); no worker runs, so they wait."""
    for (name, priority), count in plan.items():
        for n in range(count):
            platform.task(name).apply_async(kwargs={"label": f"{priority}{n}"}, priority=priority)


PLAN = {("demo.work", "low"): 3, ("demo.work", "critical"): 2, ("demo.generate_text", "high"): 4}


def _snapshot(platform: Platform, sessions: sessionmaker[Session]) -> Snapshot:
    return Stats(platform.app, sessions).snapshot(window=WINDOW)


def test_redis_depths_are_reported_per_priority(tmp_path: Path) -> None:
    with (
        make_platform("redis", tmp_path, history_enabled=False) as platform,
        history("sqlite", tmp_path) as sessions,
    ):
        _publish(platform, PLAN)
        platform.task("demo.work").apply_async(kwargs={"label": "plain"})  # normal by default

        snapshot = _snapshot(platform, sessions)

    depths = {(d.queue, d.priority): d.messages for d in snapshot.depths}
    assert len(depths) == len(QUEUES) * 4
    assert {key: n for key, n in depths.items() if n} == {
        ("default", "low"): 3,
        ("default", "critical"): 2,
        ("default", "normal"): 1,
        ("ai", "high"): 4,
    }
    assert (snapshot.depth("default"), snapshot.depth("ai"), snapshot.depth("email")) == (6, 4, 0)
    assert snapshot.dead_letters == dict.fromkeys(QUEUES, 0)
    text = exposition(snapshot, evaluate(snapshot)).splitlines()
    assert 'tasks_queue_depth{queue="default",priority="critical"} 2' in text
    assert 'tasks_queue_depth{queue="ai",priority="high"} 4' in text


@pytest.mark.parametrize("broker", ["rabbitmq", "embedded"])
def test_brokers_without_priority_lists_report_totals(broker: str, tmp_path: Path) -> None:
    with (
        make_platform(broker, tmp_path, history_enabled=False) as platform,
        history("sqlite", tmp_path) as sessions,
    ):
        _publish(platform, PLAN)

        snapshot = wait_for(
            lambda: (s := _snapshot(platform, sessions)).depth("default") == 5 and s,
            10,
            what="the published jobs to be counted",
        )

    assert {d.priority for d in snapshot.depths} == {"all"}
    assert {d.queue: d.messages for d in snapshot.depths} == dict.fromkeys(QUEUES, 0) | {
        "default": 5,
        "ai": 4,
    }


def test_unreadable_broker_and_history_are_named_not_raised(tmp_path: Path) -> None:
    settings = Settings(
        broker_url="redis://127.0.0.1:1/0", data_dir=tmp_path, history_enabled=False
    )
    app = create_app(settings, set_as_current=False)
    engine = create_history_engine(settings)  # no tables: never migrated
    try:
        snapshot = Stats(app, session_factory(engine)).snapshot()
    finally:
        engine.dispose()
        app.close()

    assert set(snapshot.unavailable) == {"broker", "history"}
    assert "no such table" in snapshot.unavailable["history"]
    assert evaluate(snapshot).level is Level.CRITICAL


# -- health with real workers ------------------------------------------------------------------
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_health_is_critical_until_a_worker_drains_the_queue(broker: str, tmp_path: Path) -> None:
    with (
        make_platform(broker, tmp_path, history_enabled=False) as platform,
        history("postgres", tmp_path) as sessions,
    ):
        task = platform.task("demo.work")
        for n in range(3):
            task.apply_async(kwargs={"label": f"ok{n}"}, priority="low")
        task.apply_async(kwargs={"label": "doomed", "fail_permanently": True})
        stats = Stats(platform.app, sessions)

        waiting = wait_for(
            lambda: (v := stats.health()).level is Level.CRITICAL and v,
            10,
            what="a critical verdict",
        )
        assert [(a.rule, a.subject, a.value) for a in waiting.alerts] == [
            ("unconsumed_queue", "default", 4)
        ]

        platform.worker()
        drained = wait_for(lambda: _settled(stats), 60, what="the queue to drain")
        assert drained.level is Level.WARNING  # the doomed job is a dead letter now
        assert [(a.rule, a.subject) for a in drained.alerts] == [("dead_letters", "default")]

        platform.dead_letters().purge(queue="default", actor="test")
        assert stats.health().level is Level.HEALTHY


def _settled(stats: Stats) -> Any:
    snapshot = stats.snapshot()
    drained = sum(d.messages for d in snapshot.depths) == 0
    if drained and snapshot.dead_letters.get("default") == 1:
        return evaluate(snapshot)
    return None


def test_a_rabbitmq_queue_never_declared_counts_as_empty(tmp_path: Path) -> None:
    require_service("rabbitmq", RABBITMQ_URL)
    prefix = f"t{uuid.uuid4().hex[:10]}-"  # nothing declared under it, so nothing to clean up
    settings = Settings(
        broker_url=RABBITMQ_URL, queue_prefix=prefix, data_dir=tmp_path, history_enabled=False
    )
    app = create_app(settings, set_as_current=False)
    try:
        with app.connection_for_read() as connection:
            depths = queue_depths(connection, app.topology)
    finally:
        app.close()

    assert [(d.queue, d.priority, d.messages) for d in depths] == [
        (queue, "all", 0) for queue in QUEUES
    ]
