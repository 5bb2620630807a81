"""``dlq groups`` and group replay/purge, run as a user runs them: a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Platform, make_platform, postgres_schema, wait_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from tasks_platform.history.database import create_history_engine
from tasks_platform.history.migrations import upgrade
from tasks_platform.history.models import AuditEntry
from tasks_platform.process import settings_env

CLI = [sys.executable, "-m", "tasks_platform"]
HEADER = ["group", "job", "exception", "queues", "jobs", "first dead", "last dead", "message"]


def _run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")} | env
    return subprocess.run(
        [*CLI, *args], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """Redis, with its history and audit log in a fresh, migrated PostgreSQL schema."""
    with postgres_schema() as url, make_platform("redis", tmp_path, database_url=url) as made:
        upgrade(made.settings)
        yield made


def _kill_jobs(platform: Platform) -> dict[str, str]:
    """Two jobs of demo.work and one of demo.send_email dying for good; the worker stopped."""
    worker = platform.worker()
    ids = {
        label: platform.task(name).delay(label=label, fail_permanently=True).id
        for label, name in [("order-17", "demo.work"), ("order-2024", "demo.work"),
                            ("mail-9", "demo.send_email")]
    }  # fmt: skip
    wait_for(lambda: len(platform.dead_letters().list()) == 3, 60, what="three dead letters")
    worker.stop()
    return ids


def _json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line]


def _columns(table: str) -> list[list[str]]:
    """The cells of an aligned table, cut where the header's columns start."""
    lines = table.splitlines()
    header = lines[0]
    starts = [header.index(name) for name in HEADER]
    assert set(lines[1]) == {"-", " "}, "a rule under the header"
    cells = []
    for line in lines[2:]:
        bounds = [*starts[1:], len(line)]
        cells.append([line[a:b].strip() for a, b in zip(starts, bounds, strict=True)])
    return cells


def test_dlq_groups_prints_an_aligned_table_and_json(platform: Platform) -> None:
    env = settings_env(platform.settings)
    ids = _kill_jobs(platform)

    shown = _run(env, "dlq", "groups")

    assert shown.returncode == 0, shown.stderr
    *table, footer = shown.stdout.rstrip("\n").splitlines()
    assert footer == "2 group(s), 3 job(s)"
    assert table[0].split() == ["group", "job", "exception", "queues", "jobs", "first", "dead",
                                "last", "dead", "message"]  # fmt: skip
    rows = _columns("\n".join(table))
    assert [row[1:5] for row in rows] == [
        ["demo.work", "SimulatedRejection", "default", "2"],
        ["demo.send_email", "SimulatedRejection", "email", "1"],
    ]
    assert [row[7] for row in rows] == [
        "order-<n>: rejected for good",
        "mail-<n>: rejected for good",
    ]
    assert all(len(row[0]) == 12 and int(row[0], 16) >= 0 for row in rows)

    documents = _json_lines(_run(env, "dlq", "groups", "--json"))
    assert [d["fingerprint"] for d in documents] == [row[0] for row in rows]
    assert sorted(documents[0]["task_ids"]) == sorted([ids["order-17"], ids["order-2024"]])
    assert documents[1]["task_ids"] == [ids["mail-9"]]
    assert documents[0]["example"] in (
        "order-17: rejected for good",
        "order-2024: rejected for good",
    )

    only_email = _json_lines(_run(env, "dlq", "groups", "email", "--json"))
    assert [d["fingerprint"] for d in only_email] == [rows[1][0]]
    members = _json_lines(_run(env, "dlq", "list", "--group", rows[0][0], "--json"))
    assert sorted(d["task_id"] for d in members) == sorted([ids["order-17"], ids["order-2024"]])


def test_dlq_replay_and_purge_of_a_group_act_on_its_members_and_are_audited(
    platform: Platform,
) -> None:
    env = settings_env(platform.settings) | {"TASKS_ACTOR": "ops-alice"}
    ids = _kill_jobs(platform)
    work_group, email_group = (
        d["fingerprint"] for d in _json_lines(_run(env, "dlq", "groups", "--json"))
    )

    replay = _run(env, "dlq", "replay", "--group", work_group, "--reason", "provider fixed")
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.strip() == "replayed 2 job(s)"
    queue = platform.app.topology.work_queue("default")
    with platform.app.connection_for_write() as connection:
        assert queue(connection.default_channel).queue_declare(passive=True).message_count == 2
    assert [letter.task_id for letter in platform.dead_letters().list()] == [ids["mail-9"]]

    purge = _run(env, "dlq", "purge", "--group", email_group, "--yes")
    assert purge.returncode == 0, purge.stderr
    assert purge.stdout.strip() == "purged 1 message(s)"
    assert platform.dead_letters().list() == []

    engine = create_history_engine(platform.settings)
    try:
        with Session(engine) as session:
            entries = list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    finally:
        engine.dispose()
    assert [(e.actor, e.action, e.target, e.reason) for e in entries] == [
        ("ops-alice", "dlq.replay", f"group:{work_group}", "provider fixed"),
        ("ops-alice", "dlq.purge", f"group:{email_group}", None),
    ]
    assert entries[0].detail is not None
    assert sorted(entries[0].detail["task_ids"]) == sorted([ids["order-17"], ids["order-2024"]])
    assert entries[1].detail == {"count": 1, "task_ids": [ids["mail-9"]], "messages": 1}


def test_dlq_group_errors_are_one_clear_line(platform: Platform) -> None:
    env = settings_env(platform.settings)

    for command in (["replay", "--group", "0123456789ab"], ["purge", "--group", "nosuch", "--yes"]):
        unknown = _run(env, "dlq", *command)
        assert unknown.returncode == 2, unknown.stderr
        group = command[2]
        assert unknown.stderr.strip() == f"error: no dead letters in group {group!r}"
        assert unknown.stdout == ""

    two_targets = _run(env, "dlq", "replay", "--group", "0123456789ab", "--queue", "default")
    assert two_targets.returncode == 2
    assert "exactly one of: a TASK_ID, --queue QUEUE, --group GROUP, --all" in two_targets.stderr

    bad_queue = _run(env, "dlq", "groups", "nosuchqueue")
    assert bad_queue.returncode == 2
    assert "unknown queue 'nosuchqueue'" in bad_queue.stderr


def test_dlq_replay_without_an_audit_log_does_nothing_and_says_why(tmp_path: Path) -> None:
    with postgres_schema() as url, make_platform("redis", tmp_path, database_url=url) as platform:
        env = settings_env(platform.settings)  # a schema with no tables: never migrated
        _kill_jobs(platform)

        refused = _run(env, "dlq", "replay", "--all", "--reason", "try")

        assert refused.returncode == 1
        assert refused.stderr.startswith("Error: history database: ")
        assert "audit_log" in refused.stderr
        assert "(not migrated? run: tasks-platform db upgrade)" in refused.stderr
        assert len(platform.dead_letters().list()) == 3, "nothing was replayed"
