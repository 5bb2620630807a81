"""``tasks-platform relay --once``, run as an operator runs it: it publishes what waits in the
outbox and exits; on the embedded default (SQLite history, file broker) and on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Platform, make_platform, postgres_schema

from tasks_platform.history.migrations import upgrade
from tasks_platform.history.models import Job
from tasks_platform.outbox import pending
from tasks_platform.outbox.submit import sessions_for
from tasks_platform.process import settings_env
from tasks_platform.stats.broker import queue_depths


@pytest.fixture(params=["embedded", "rabbitmq"])
def cli_platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    """Embedded: SQLite history and the file broker. rabbitmq: with a PostgreSQL history."""
    with contextlib.ExitStack() as stack:
        overrides = {}
        if request.param != "embedded":
            overrides["database_url"] = stack.enter_context(postgres_schema())
        platform = stack.enter_context(make_platform(request.param, tmp_path, **overrides))
        upgrade(platform.settings)
        yield platform


def relay_once(platform: Platform) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    return subprocess.run(
        [sys.executable, "-m", "tasks_platform", "relay", "--once"],
        env=env | settings_env(platform.settings), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def queued(platform: Platform) -> int:
    with platform.app.connection_for_write() as connection:
        return sum(d.messages for d in queue_depths(connection, platform.app.topology)
                   if d.queue == "default")  # fmt: skip


def test_relay_once_publishes_what_waits_in_the_outbox_and_exits(cli_platform: Platform) -> None:
    platform = cli_platform
    with sessions_for(platform.app).begin() as session:
        ids = [platform.task("demo.work").delay_in(session, label=f"r{n}").id for n in range(3)]

    first = relay_once(platform)
    assert first.returncode == 0, first.stderr
    assert "published 3 job(s)" in first.stdout
    assert queued(platform) == 3
    with sessions_for(platform.app)() as session:
        assert pending(session) == []
        assert {session.get(Job, job_id).state for job_id in ids} == {"queued"}

    again = relay_once(platform)  # nothing left: nothing published twice
    assert again.returncode == 0, again.stderr
    assert "published 0 job(s)" in again.stdout
    assert queued(platform) == 3
