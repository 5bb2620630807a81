"""Pausing and resuming queues on real brokers and real workers, with a PostgreSQL history.

Celery's ``cancel_consumer`` only reaches the workers running at that moment; a paused queue
here stays paused for workers started later, until it is resumed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy
from conftest import make_platform, wait_for
from control_helpers import (
    ACTOR,
    BROKERS,
    audit_entries,
    consumes,
    control_of,
    control_platform,
    job_row,
    queue_depth,
    stop_together,
    submit,
    wait_state,
)
from sqlalchemy.orm import Session


@pytest.mark.parametrize("broker", BROKERS)
def test_paused_queue_stays_paused_across_a_worker_restart_until_resumed(
    broker: str, tmp_path: Path
) -> None:
    with control_platform(broker, tmp_path) as platform:
        control, runs = control_of(platform), platform.runs()
        first = platform.worker()
        control.pause("default", actor=ACTOR, reason="maintenance")
        wait_for(lambda: not consumes(platform, first, "default"), 10,
                 what="the live worker to stop consuming default")  # fmt: skip
        held = submit(platform, "held", runs)
        time.sleep(2)
        assert runs.starts("held") == []

        first.stop()
        second, other = platform.worker(start=False), platform.worker(start=False, queues=["email"])
        for worker in (second, other):
            worker.start(platform.app, wait=False)
        for worker in (second, other):
            worker.wait_ready(platform.app)
        time.sleep(2)
        assert runs.starts("held") == []
        assert job_row(platform, held).state == "queued"  # type: ignore[union-attr]
        assert queue_depth(control, "default") == 1  # a paused queue still takes jobs
        assert not consumes(platform, second, "default")
        assert [pause.queue for pause in control.paused()] == ["default"]

        control.resume("default", actor=ACTOR)

        wait_state(platform, held, "succeeded")
        assert consumes(platform, second, "default")
        assert not consumes(platform, other, "default")  # never consumed it: not now either
        assert control.paused() == []
        entries = [(e.action, e.target, e.reason) for e in audit_entries(platform)]
        assert entries == [
            ("queue.pause", "queue:default", "maintenance"),
            ("queue.resume", "queue:default", None),
        ]
        stop_together(second, other)


def test_embedded_broker_carries_the_pause_resume_and_cancel_broadcasts(tmp_path: Path) -> None:
    with control_platform("embedded", tmp_path) as platform:
        control, runs = control_of(platform), platform.runs()
        worker = platform.worker()

        control.pause("email", actor=ACTOR)
        wait_for(lambda: not consumes(platform, worker, "email"), 10,
                 what="the worker to stop consuming email")  # fmt: skip
        long = submit(platform, "long", runs, duration=60)
        wait_for(lambda: runs.starts("long"), 30, what="the long job to start")
        wait_state(platform, long, "started")
        assert control.cancel(long, actor=ACTOR) == "terminating"
        wait_state(platform, long, "revoked", timeout=20)
        control.resume("email", actor=ACTOR)
        wait_for(lambda: consumes(platform, worker, "email"), 10,
                 what="the worker to consume email again")  # fmt: skip


def test_worker_rechecks_the_store_and_follows_a_pause_it_was_not_told_about(
    tmp_path: Path,
) -> None:
    with control_platform("redis", tmp_path, control_recheck_interval=1) as platform:
        worker = platform.worker()
        with Session(platform.history) as session, session.begin():
            session.execute(sqlalchemy.text(
                "INSERT INTO queue_pauses (queue, paused_at, actor) VALUES ('email', now(), 'x')"
            ))  # fmt: skip
        wait_for(lambda: not consumes(platform, worker, "email"), 10,
                 what="the worker to stop consuming email on its own")  # fmt: skip
        assert consumes(platform, worker, "default")


def test_worker_whose_history_database_is_down_still_starts_and_runs_jobs(tmp_path: Path) -> None:
    unreachable = "postgresql+psycopg://postgres@127.0.0.1:9/nowhere"
    with make_platform("redis", tmp_path, database_url=unreachable,
                       history_enabled=False) as platform:  # fmt: skip
        runs = platform.runs()
        platform.worker()
        submit(platform, "anyway", runs)
        wait_for(lambda: runs.dones("anyway"), 30, what="the job to run")
        assert "cannot read queue pauses and cancellations" in platform.logs()
