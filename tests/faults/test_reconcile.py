"""``tasks-platform reconcile``: a message deleted behind the platform's back is found and run once.

Every test runs on both brokers, with a PostgreSQL history. Messages are removed the way an
accident would: ``LREM`` on the Redis list, a raw kombu channel that takes and acks the message
on RabbitMQ, while no worker consumes the queue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Platform, make_platform, postgres_schema, wait_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from tasks_platform.errors import ConfigurationError
from tasks_platform.history import recorder
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.migrations import upgrade
from tasks_platform.history.models import AuditEntry, Job, JobEvent
from tasks_platform.outbox.relay import Relay
from tasks_platform.process import settings_env
from tasks_platform.reconcile import Reconciler, Report, Verdict
from tasks_platform.settings import BrokerKind
from tasks_platform.stats.broker import redis_list_name
from tasks_platform.topology import REDIS_PRIORITY_STEPS

CLI = [sys.executable, "-m", "tasks_platform"]
NO_GRACE = timedelta(0)


@pytest.fixture(params=["redis", "rabbitmq"])
def platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    """A platform on each server broker whose history is a fresh PostgreSQL schema."""
    with postgres_schema() as url, make_platform(request.param, tmp_path, database_url=url,
                                                 history_flush_interval=0.2) as made:  # fmt: skip
        upgrade(made.settings)
        made.history = create_history_engine(made.settings)
        try:
            yield made
        finally:
            made.history.dispose()


def _reconciler(platform: Platform) -> Reconciler:
    return Reconciler(platform.app, session_factory(platform.history), inspect_timeout=0.5,
                      confirm_delay=0.3)  # fmt: skip


def _row(platform: Platform, job_id: str) -> Job | None:
    with Session(platform.history) as session:
        return session.get(Job, job_id)


def _wait_state(platform: Platform, job_id: str, state: str) -> Job:
    def reached() -> Job | None:
        row = _row(platform, job_id)
        return row if row is not None and row.state == state else None

    return wait_for(reached, 60, what=f"job {job_id} to be {state}")  # type: ignore[no-any-return]


def _queued_ids(platform: Platform) -> list[str]:
    """The task ids waiting in the default work queue (read without consuming them)."""
    app = platform.app
    with app.connection_for_write() as connection:
        if app.settings.broker_kind is BrokerKind.REDIS:
            client = connection.default_channel.client
            name = app.topology.queue_name("default")
            raw = [m for s in REDIS_PRIORITY_STEPS
                   for m in client.lrange(redis_list_name(name, s), 0, -1)]  # fmt: skip
            return [json.loads(m)["headers"]["id"] for m in raw]
        return _take(connection, platform, delete=None)


def _delete_behind_the_back(platform: Platform, job_id: str) -> None:
    """Remove ``job_id``'s message from the default work queue, as an accident would."""
    app = platform.app
    with app.connection_for_write() as connection:
        if app.settings.broker_kind is BrokerKind.REDIS:
            client = connection.default_channel.client
            name = app.topology.queue_name("default")
            for step in REDIS_PRIORITY_STEPS:
                key = redis_list_name(name, step)
                for raw in client.lrange(key, 0, -1):
                    if json.loads(raw)["headers"]["id"] == job_id:
                        assert client.lrem(key, 1, raw) == 1
                        return
            raise AssertionError(f"{job_id} is not in {name}")
        assert job_id in _take(connection, platform, delete=job_id)


def _take(connection: Any, platform: Platform, *, delete: str | None) -> list[str]:
    """RabbitMQ: take every message of the default queue, ack ``delete``'s, put back the rest."""
    channel = connection.channel()
    try:
        queue = platform.app.topology.work_queue("default")(channel)
        ids = []
        for _ in range(int(queue.queue_declare(passive=True).message_count)):
            message = queue.get(no_ack=False)
            if message is None:
                break
            ids.append(message.headers["id"])
            if message.headers["id"] == delete:
                message.ack()
    finally:
        channel.close()  # the messages not acked go back
    return ids


def _submit(platform: Platform, label: str, **payload: Any) -> str:
    runs = platform.runs()
    return str(platform.task("demo.work").delay(label=label, record_to=str(runs.path),
                                                **payload).id)  # fmt: skip


def _verdicts(report: Report) -> dict[str, Verdict]:
    return {finding.id: finding.verdict for finding in report.findings}


def test_message_deleted_from_the_broker_is_found_lost_requeued_once_and_run_once(
    platform: Platform,
) -> None:
    lost, kept = _submit(platform, "lost"), _submit(platform, "kept")
    _wait_state(platform, lost, "queued"), _wait_state(platform, kept, "queued")
    _delete_behind_the_back(platform, lost)

    # report only (the default): flagged, nothing sent; the CLI says the same and exits 1
    report = _reconciler(platform).run(older_than=NO_GRACE)
    assert _verdicts(report) == {lost: Verdict.LOST}
    assert (report.checked, report.held) == (2, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    env |= settings_env(platform.settings)
    command = [*CLI, "reconcile", "--older-than", "1s", "--json", "--inspect-timeout", "0.5",
               "--confirm-delay", "0.3"]  # fmt: skip
    cli = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60,
                         check=False)  # fmt: skip
    assert cli.returncode == 1, cli.stderr
    assert [f["id"] for f in json.loads(cli.stdout)["findings"]] == [lost]
    assert sorted(_queued_ids(platform)) == [kept]

    # two reconcilers fixing at once: the job is queued again exactly once
    reports: list[Report] = []
    runners = [threading.Thread(target=lambda: reports.append(
        _reconciler(platform).run(older_than=NO_GRACE, fix=True, actor="test:ops")))
        for _ in range(2)]  # fmt: skip
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(60)
    assert sum(r.count(Verdict.REQUEUED) for r in reports) == 1, reports
    assert sorted(_queued_ids(platform)) == sorted([kept, lost])
    assert _reconciler(platform).run(older_than=NO_GRACE).findings == []  # present: not lost

    with Session(platform.history) as session:
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "jobs.reconcile"))
        assert [entry.detail["requeued"] for entry in audit if entry.detail["requeued"]] == [[lost]]
        details = session.scalars(select(JobEvent.detail).where(JobEvent.job_id == lost)).all()
        assert {"reconciled": True, "was": "queued", "actor": "test:ops"} in details

    platform.worker(concurrency=1)
    runs = platform.runs()
    assert _wait_state(platform, lost, "succeeded").attempts == 1
    _wait_state(platform, kept, "succeeded")
    wait_for(lambda: len(runs.dones()) == 2, 30, what="both jobs to finish")
    assert (len(runs.starts("lost")), len(runs.dones("lost"))) == (1, 1)  # exactly once

    # jobs running, waiting behind it, or held by the worker for a countdown: never flagged
    running = _submit(platform, "running", duration=4)
    _wait_state(platform, running, "started")
    waiting = _submit(platform, "waiting")  # behind the running job (one process, prefetch 1)
    later = str(platform.task("demo.work").apply_async(kwargs={"label": "later"},
                                                         countdown=60).id)  # fmt: skip
    wait_for(lambda: _row(platform, later) and _row(platform, waiting), 30, what="their rows")
    report = _reconciler(platform).run(older_than=NO_GRACE, fix=True)
    assert report.findings == [], report
    assert (report.checked, report.held) == (3, 3)
    _wait_state(platform, waiting, "succeeded")
    assert (len(runs.starts("running")), len(runs.starts("waiting"))) == (1, 1)


@pytest.mark.parametrize("platform", ["redis"], indirect=True)  # history logic: one broker
def test_lost_job_with_a_redacted_payload_is_unrecoverable_and_never_sent(
    platform: Platform,
) -> None:
    task = platform.task("demo.sync_account")
    job_id = str(task.delay(account="acme", password="s3cret", api_key="k").id)
    _wait_state(platform, job_id, "queued")
    _delete_behind_the_back(platform, job_id)

    report = _reconciler(platform).run(older_than=NO_GRACE, fix=True)
    (finding,) = report.findings
    assert finding.verdict is Verdict.UNRECOVERABLE
    assert "redacted" in (finding.reason or "")
    assert "password" in (finding.reason or "")
    assert report.unresolved == 1
    assert _queued_ids(platform) == []  # never sent with "[redacted]" for a password
    recorder.close_all()


@pytest.mark.parametrize("platform", ["redis"], indirect=True)  # the outbox: one broker
def test_lost_outbox_job_is_sent_again_from_its_outbox_row_secrets_and_all(
    platform: Platform,
) -> None:
    task = platform.task("demo.sync_account")
    with Session(platform.history) as session, session.begin():
        job_id = str(task.delay_in(session, account="acme", password="s3cret", api_key="k").id)
    assert _reconciler(platform).run(older_than=NO_GRACE).checked == 0  # pending: the relay's
    relay = Relay(platform.app)
    try:
        assert relay.drain() == 1
    finally:
        relay.close()
    _wait_state(platform, job_id, "queued")
    _delete_behind_the_back(platform, job_id)

    report = _reconciler(platform).run(older_than=NO_GRACE, fix=True)
    (finding,) = report.findings
    assert (finding.verdict, finding.source) == (Verdict.REQUEUED, "outbox")
    held = _reconciler(platform).run(older_than=NO_GRACE)  # pending in the outbox again
    assert (held.findings, held.held) == ([], 1)

    platform.worker(concurrency=1)  # its relay publishes the row; the password is intact
    row = _wait_state(platform, job_id, "succeeded")
    assert row.result == {"account": "acme", "session_token": "[redacted]"}
    with Session(platform.history) as session:
        starts = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.state == "started")
        ).all()
    assert len(starts) == 1


def test_reconcile_refuses_the_embedded_broker(tmp_path: Path) -> None:
    with make_platform("embedded", tmp_path) as embedded:
        engine = create_history_engine(embedded.settings)
        try:
            with pytest.raises(ConfigurationError, match="Redis or RabbitMQ"):
                Reconciler(embedded.app, session_factory(engine)).run(older_than=NO_GRACE)
        finally:
            engine.dispose()
