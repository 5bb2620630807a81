"""Dead letters grouped by error fingerprint; group replay and purge, audited; on every broker.

Redis and RabbitMQ keep their history (and audit log) in a fresh PostgreSQL schema migrated
like production; the embedded broker uses its SQLite default.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Platform, make_platform, postgres_schema, wait_for
from sqlalchemy import create_engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from tasks_platform.deadletter import DeadLetterGroup, DeadLetters
from tasks_platform.errors import DeadLetterGroupNotFound, UnknownQueue
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.migrations import upgrade
from tasks_platform.history.models import AuditEntry

JOB = "demo.work"
REJECTED = ("order-17", "order-2024")  # SimulatedRejection "order-<n>: rejected for good"
OUTAGES = {"order-5": 50, "order-123": 99}  # SimulatedOutage "... outage on attempt 4 of <n>"


@pytest.fixture(params=["embedded", "redis", "rabbitmq"])
def dlq_platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    if request.param == "embedded":
        with make_platform("embedded", tmp_path) as platform:
            yield platform
        return
    with postgres_schema() as url, make_platform(request.param, tmp_path, database_url=url) as made:
        upgrade(made.settings)
        yield made


def _kill_two_kinds(platform: Platform) -> dict[str, str]:
    """Four demo jobs dying of two errors; returns task id per label, once all four are dead."""
    runs = platform.runs()
    platform.worker()
    task = platform.task(JOB)
    ids = {
        label: task.delay(label=label, fail_permanently=True, record_to=str(runs.path)).id
        for label in REJECTED
    }
    for label, fail_times in OUTAGES.items():
        ids[label] = task.delay(label=label, fail_times=fail_times, record_to=str(runs.path)).id
    wait_for(lambda: len(platform.dead_letters().list()) == 4, 90, what="four dead letters")
    return ids


def _by_error(groups: list[DeadLetterGroup]) -> dict[str, DeadLetterGroup]:
    return {group.exc_type: group for group in groups}


def _audit(platform: Platform) -> list[AuditEntry]:
    engine = create_history_engine(platform.settings)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    finally:
        engine.dispose()


def test_groups_hold_exactly_the_jobs_that_died_of_the_same_error(dlq_platform: Platform) -> None:
    ids = _kill_two_kinds(dlq_platform)
    dead_letters = dlq_platform.dead_letters()

    groups = _by_error(dead_letters.groups())

    assert set(groups) == {"SimulatedRejection", "SimulatedOutage"}
    rejected, outage = groups["SimulatedRejection"], groups["SimulatedOutage"]
    assert sorted(rejected.task_ids) == sorted(ids[label] for label in REJECTED)
    assert sorted(outage.task_ids) == sorted(ids[label] for label in OUTAGES)
    assert (rejected.count, outage.count) == (2, 2)
    assert rejected.message == "order-<n>: rejected for good"
    assert outage.message == "order-<n>: outage on attempt <n> of <n>"
    assert (rejected.name, rejected.queues) == (JOB, ("default",))
    assert rejected.first_at is not None
    assert rejected.last_at is not None
    assert rejected.first_at <= rejected.last_at
    assert dead_letters.groups("default") == dead_letters.groups()
    assert dead_letters.groups("email") == []
    members = dead_letters.list(group=outage.fingerprint)
    assert sorted(letter.task_id or "" for letter in members) == sorted(outage.task_ids)
    with pytest.raises(UnknownQueue):
        dead_letters.groups("nosuchqueue")


def test_replaying_a_group_reruns_exactly_its_jobs_and_is_audited(
    dlq_platform: Platform,
) -> None:
    ids = _kill_two_kinds(dlq_platform)
    runs = dlq_platform.runs()
    dead_letters = dlq_platform.dead_letters()
    before = _by_error(dead_letters.groups())
    rejected, outage = before["SimulatedRejection"], before["SimulatedOutage"]

    replayed = dead_letters.replay(group=rejected.fingerprint, actor="alice", reason="fixed")

    assert sorted(replayed) == sorted(rejected.task_ids)
    wait_for(lambda: all(len(runs.starts(label)) == 2 for label in REJECTED), 60,
             what="the replayed jobs to run again")  # fmt: skip
    # they die again: their group is whole again, same members, nothing lost or doubled
    wait_for(lambda: len(dead_letters.list()) == 4, 60, what="the replayed jobs to die again")
    after = _by_error(dead_letters.groups())
    again = after["SimulatedRejection"]
    assert (again.fingerprint, sorted(again.task_ids)) == (
        rejected.fingerprint, sorted(rejected.task_ids)
    )  # fmt: skip
    assert after["SimulatedOutage"] == outage, "the other group is untouched"
    assert all(len(runs.starts(label)) == 4 for label in OUTAGES), "its jobs did not run again"
    assert {
        letter.task_id: letter.headers.get("x-tasks-replays") for letter in dead_letters.list()
    } == {ids["order-17"]: 1, ids["order-2024"]: 1, ids["order-5"]: None, ids["order-123"]: None}

    [entry] = _audit(dlq_platform)
    assert (entry.actor, entry.action, entry.reason) == ("alice", "dlq.replay", "fixed")
    assert entry.target == f"group:{rejected.fingerprint}"
    assert entry.detail is not None
    assert sorted(entry.detail["task_ids"]) == sorted(rejected.task_ids)
    assert entry.detail["count"] == 2


def test_purging_a_group_removes_exactly_its_letters_and_is_audited(
    dlq_platform: Platform,
) -> None:
    ids = _kill_two_kinds(dlq_platform)
    dead_letters = dlq_platform.dead_letters()
    outage = _by_error(dead_letters.groups())["SimulatedOutage"]

    assert dead_letters.purge(group=outage.fingerprint.upper(), actor="bob") == 2

    left = sorted(letter.task_id or "" for letter in dead_letters.list())
    assert left == sorted(ids[label] for label in REJECTED)
    with pytest.raises(DeadLetterGroupNotFound, match="no dead letters in group"):
        dead_letters.purge(group=outage.fingerprint, actor="bob")
    with pytest.raises(DeadLetterGroupNotFound):
        dead_letters.replay(group="0123456789ab", actor="bob")
    assert dead_letters.replay(queue="email", actor="carol", reason="empty is fine") == []
    assert dead_letters.purge(task_id=ids["order-17"], actor="dave", reason="duplicate") == 1
    assert dead_letters.purge(actor="erin") == 1
    assert dead_letters.list() == []

    entries = _audit(dlq_platform)
    assert [(e.action, e.actor, e.target, e.reason) for e in entries] == [
        ("dlq.purge", "bob", f"group:{outage.fingerprint}", None),
        ("dlq.replay", "carol", "queue:email", "empty is fine"),
        ("dlq.purge", "dave", f"job:{ids['order-17']}", "duplicate"),
        ("dlq.purge", "erin", "all", None),
    ]  # nothing recorded for the operations that found nothing to do
    # the order of ids within an entry is the order the broker listed them: not a contract
    details = [{**e.detail, "task_ids": sorted(e.detail["task_ids"])} for e in entries]
    assert details == [
        {"count": 2, "task_ids": sorted(outage.task_ids), "messages": 2},
        {"count": 0, "task_ids": []},
        {"count": 1, "task_ids": [ids["order-17"]], "messages": 1},
        {"count": 1, "task_ids": [ids["order-2024"]], "messages": 1},
    ]


def test_nothing_is_replayed_or_purged_when_the_audit_log_cannot_be_written(
    tmp_path: Path,
) -> None:
    with make_platform("redis", tmp_path) as platform:  # checked before the broker: any broker
        platform.worker()
        platform.task(JOB).delay(label="order-1", fail_permanently=True)
        wait_for(lambda: platform.dead_letters().list(), 60, what="a dead letter")
        engine = create_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # no audit_log table
        try:
            unaudited = DeadLetters(platform.app, session_factory(engine))
            with pytest.raises(SQLAlchemyError, match="audit_log"):
                unaudited.replay(actor="mallory")
            with pytest.raises(SQLAlchemyError, match="audit_log"):
                unaudited.purge(queue="default", actor="mallory")
        finally:
            engine.dispose()

        [letter] = platform.dead_letters().list()  # not purged
        assert "x-tasks-replays" not in letter.headers, "not replayed"
