"""cancel, retry, pause, resume, queues and clean, run as an operator runs them.

The embedded broker and a SQLite history under tmp_path: no server, no worker. What workers do
with a cancel or a pause is proven in tests/integration/test_control.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from conftest import Platform, make_platform
from sqlalchemy.orm import Session

from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import AuditEntry, Base, Job, JobCancellation
from tasks_platform.process import settings_env

CLI = [sys.executable, "-m", "tasks_platform"]


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Platform]:
    with make_platform("embedded", tmp_path, history_enabled=False) as platform:
        engine = create_history_engine(platform.settings)
        Base.metadata.create_all(engine)
        platform.history = engine
        try:
            yield platform
        finally:
            engine.dispose()


def _run(
    platform: Platform, *args: str, actor: str = "ops:ana"
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    env |= settings_env(platform.settings) | {"TASKS_ACTOR": actor}
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _insert(platform: Platform, *rows: Any) -> None:
    with Session(platform.history) as session, session.begin():
        session.add_all(rows)


def _job(job_id: str, state: str, **columns: Any) -> Job:
    now = datetime.now(UTC)
    values: dict[str, Any] = {"name": "demo.work", "queue": "default", "updated_at": now,
                              "queued_at": now, "kwargs": {"label": job_id}} | columns  # fmt: skip
    return Job(id=job_id, state=state, **values)


def _audit(platform: Platform) -> list[tuple[str, str, str, str | None]]:
    with Session(platform.history) as session:
        entries = session.scalars(sqlalchemy.select(AuditEntry).order_by(AuditEntry.id))
        return [(e.actor, e.action, e.target, e.reason) for e in entries]


def test_control_commands_refuse_what_cannot_be_done_with_one_clear_line(
    embedded: Platform,
) -> None:
    _insert(embedded, _job("done-1", "succeeded"), _job("waiting-1", "queued"))

    expected = {
        ("cancel", "nope"): "error: no job with id 'nope' in the history",
        ("retry", "nope"): "error: no job with id 'nope' in the history",
        ("cancel", "done-1"): "error: job done-1 already ended (succeeded): nothing to cancel",
        ("retry", "waiting-1"): "error: job waiting-1 is queued; only cancelled, dead, expired, "
        "failed, revoked jobs can be retried",
        ("pause", "nope"): "error: unknown queue 'nope'; declared queues: ai, email, reports, "
        "webhooks, payments, default",
        ("resume", "email.dead"): "error: unknown queue 'email.dead'",
    }
    for args, message in expected.items():
        result = _run(embedded, *args)
        assert (result.returncode, result.stdout) == (2, ""), (args, result.stderr)
        assert result.stderr.startswith(message), (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert _run(embedded, "cancel").returncode == 2  # the id is required
    assert _audit(embedded) == []  # refusals leave no trace


def test_pause_resume_and_queues_are_audited_with_the_operator(embedded: Platform) -> None:
    paused = _run(embedded, "pause", "email", "--reason", "SMTP provider down")
    assert paused.returncode == 0, paused.stderr
    assert "paused email" in paused.stdout

    table = _run(embedded, "queues")
    assert table.returncode == 0, table.stderr
    [email] = [line for line in table.stdout.splitlines() if line.startswith("email")]
    assert email.split()[1:3] == ["0", "paused"]
    assert "ops:ana" in email
    assert "SMTP provider down" in email
    listed = [json.loads(line) for line in _run(embedded, "queues", "--json").stdout.splitlines()]
    assert [(q["name"], q["paused"]) for q in listed if q["paused"]] == [("email", True)]
    assert len(listed) == 6

    assert _run(embedded, "resume", "email", actor="ops:bo").returncode == 0
    listed = [json.loads(line) for line in _run(embedded, "queues", "--json").stdout.splitlines()]
    assert not any(q["paused"] for q in listed)
    assert _audit(embedded) == [
        ("ops:ana", "queue.pause", "queue:email", "SMTP provider down"),
        ("ops:bo", "queue.resume", "queue:email", None),
    ]


def test_cancel_then_retry_a_waiting_job_records_both(embedded: Platform) -> None:
    _insert(embedded, _job("waiting-1", "queued"))

    cancelled = _run(embedded, "cancel", "waiting-1", "--reason", "duplicate order")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith("cancelled waiting-1: it will not run")
    retried = _run(embedded, "retry", "waiting-1")
    assert retried.returncode == 0, retried.stderr
    new_id = retried.stdout.split()[-1]

    assert retried.stdout.startswith(f"retrying waiting-1 as new job {new_id}")
    with Session(embedded.history) as session:
        assert session.get(JobCancellation, "waiting-1") is not None
        entries = list(session.scalars(sqlalchemy.select(AuditEntry).order_by(AuditEntry.id)))
    assert [(e.action, e.reason) for e in entries] == [
        ("job.cancel", "duplicate order"),
        ("job.retry", None),
    ]
    assert entries[1].detail == {"new_job_id": new_id, "state": "queued",
                                 "payload_from": "history"}  # fmt: skip


def test_clean_is_audited(embedded: Platform) -> None:
    old = datetime.now(UTC) - timedelta(days=30)
    _insert(embedded, _job("old", "succeeded", finished_at=old, updated_at=old))

    result = _run(embedded, "clean", "--older-than", "7d")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deleted 1 job(s)")
    assert _audit(embedded) == [("ops:ana", "history.clean", "history", None)]
