"""Outbox relays on real PostgreSQL and both server brokers: two relays publish 5,000 jobs
each exactly once, and a relay SIGKILLed mid-batch loses nothing (its duplicates run once).

The outbox is filled in bulk (one job through ``apply_in``, copied with new ids): these tests
are about the relays, and submitting thousands of jobs one by one would cost most of their
time (the submit path has tests of its own in test_outbox.py)."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Platform, make_platform, postgres_schema, wait_for
from sqlalchemy import Table, func, insert, select

from tasks_platform.history.migrations import upgrade
from tasks_platform.history.models import Job, OutboxMessage
from tasks_platform.outbox import CHANNEL, pending
from tasks_platform.outbox.relay import Relay
from tasks_platform.outbox.submit import sessions_for
from tasks_platform.process import settings_env
from tasks_platform.stats.broker import queue_depths

pytestmark = pytest.mark.postgres

JOBS: Table = Job.__table__  # type: ignore[assignment]
OUTBOX: Table = OutboxMessage.__table__  # type: ignore[assignment]


@pytest.fixture(params=["redis", "rabbitmq"])
def relay_platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    """A platform on each server broker whose history (and outbox) is a fresh PG schema."""
    with postgres_schema() as url, make_platform(request.param, tmp_path, database_url=url) as p:
        upgrade(p.settings)
        yield p


def depth(platform: Platform) -> int:
    with platform.app.connection_for_write() as connection:
        return sum(d.messages for d in queue_depths(connection, platform.app.topology)
                   if d.queue == "default")  # fmt: skip


def fill_outbox(platform: Platform, count: int, prefix: str) -> list[str]:
    """Commit ``count`` demo.work jobs labelled ``<prefix><n>`` to the outbox; their ids."""
    task = platform.task("demo.work")
    sessions = sessions_for(platform.app)
    record_to = str(platform.runs().path)
    with sessions.begin() as session:
        first = task.apply_in(session, kwargs={"label": f"{prefix}0", "record_to": record_to}).id
    with sessions.begin() as session:
        job = dict(session.execute(select(JOBS).where(JOBS.c.id == first)).mappings().one())
        row = dict(session.execute(select(OUTBOX).where(OUTBOX.c.id == first)).mappings().one())
        ids, jobs, rows = [first], [], []
        for number in range(1, count):
            job_id = str(uuid.uuid4())
            message = copy.deepcopy(row["message"])
            message["id"] = job_id
            message["kwargs"]["label"] = f"{prefix}{number}"
            ids.append(job_id)
            jobs.append({**job, "id": job_id})
            rows.append({**row, "id": job_id, "message": message})
        if rows:
            session.execute(insert(JOBS), jobs)
            session.execute(insert(OUTBOX), rows)
        session.execute(select(func.pg_notify(CHANNEL, "")))
    return ids


def pending_count(platform: Platform) -> int:
    with sessions_for(platform.app)() as session:
        return len(pending(session))


@contextmanager
def relaying(app: Any, count: int, batch_size: int = 500) -> Iterator[list[Relay]]:
    stop = threading.Event()
    relays = [Relay(app, batch_size=batch_size) for _ in range(count)]
    threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in relays]
    for thread in threads:
        thread.start()
    try:
        yield relays
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def test_two_relays_publish_5000_jobs_each_exactly_once(relay_platform: Platform) -> None:
    platform = relay_platform
    with relaying(platform.app, count=2) as relays:
        fill_outbox(platform, 5000, "j")  # committed while both relays listen
        wait_for(lambda: pending_count(platform) == 0, 150, what="every row published")
    assert depth(platform) == 5000  # the broker holds each job once: none published twice
    assert sum(r.stats.published for r in relays) == 5000
    assert all(r.stats.published > 0 for r in relays), "one relay did all the work"
    with sessions_for(platform.app)() as session:
        attempts = session.execute(
            select(OutboxMessage.attempts, func.count()).group_by(OutboxMessage.attempts)
        ).all()
        states = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    assert attempts == [(1, 5000)]  # each row published in one round
    assert states == [("queued", 5000)]


def test_relay_killed_mid_batch_loses_nothing_and_duplicates_run_once(
    relay_platform: Platform, tmp_path: Path
) -> None:
    platform = relay_platform
    count = 400
    fill_outbox(platform, count, "k")
    log = (tmp_path / "relay.log").open("wb")
    relay = subprocess.Popen(
        [sys.executable, "-m", "tasks_platform", "relay", "--batch-size", str(count)],
        env={**settings_env(platform.settings), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    try:
        published = wait_for(
            lambda: depth(platform), 60, what="the relay to publish", interval=0.005
        )
        relay.send_signal(signal.SIGKILL)
    finally:
        relay.kill()
        relay.wait(timeout=10)
        log.close()
    assert 0 < published < count, "the relay was not killed mid-batch"
    assert pending_count(platform) == count  # its transaction never committed

    platform.worker()  # its relay publishes the batch again, and it runs everything
    wait_for(lambda: len(platform.runs().dones()) >= count, 120, what="every job to run")
    wait_for(lambda: depth(platform) == 0, 60, what="the duplicates to be consumed")
    labels = [run[0] for run in platform.runs().starts()]
    assert sorted(labels) == sorted(f"k{n}" for n in range(count))  # each exactly once
    assert "published twice" in platform.logs()  # the duplicates were acknowledged, not run
    assert pending_count(platform) == 0
