"""Cancel and retry on real brokers, real workers and a PostgreSQL history; clean; the errors.

Celery's own revokes live in the memory of the workers running at that moment; these tests
cancel while no worker runs and start one afterwards, to prove that the platform's last.
Pausing queues is in test_control_pause.py.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy
from conftest import wait_for
from control_helpers import (
    ACTOR,
    BROKERS,
    audit_entries,
    control_of,
    control_platform,
    event_states,
    insert,
    job_row,
    queue_depth,
    settled_event_states,
    submit,
    wait_state,
)
from sqlalchemy.orm import Session

from tasks_platform.errors import JobFinished, JobNotFound, JobNotRetryable, UnknownQueue
from tasks_platform.history.models import Job, JobCancellation


# -- cancel ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("broker", [*BROKERS, "embedded"])
def test_job_cancelled_while_no_worker_runs_is_discarded_by_the_next_worker(
    broker: str, tmp_path: Path
) -> None:
    with control_platform(broker, tmp_path) as platform:
        control, runs = control_of(platform), platform.runs()
        platform.worker().stop()  # a worker ran, and is down when the job is cancelled
        doomed = submit(platform, "doomed", runs)
        wait_state(platform, doomed, "queued")

        assert control.cancel(doomed, actor=ACTOR, reason="customer asked") == "cancelled"
        assert queue_depth(control, "default") == 1  # the broker still holds the job

        platform.worker()  # knows nothing of the cancel but what the history says
        later = submit(platform, "later", runs)
        wait_state(platform, later, "succeeded")
        job = wait_state(platform, doomed, "cancelled")

        assert runs.starts("doomed") == []
        assert job.started_at is None
        expected = ["queued", "cancelled"]
        assert settled_event_states(platform, doomed, expected) == expected
        assert queue_depth(control, "default") == 0
        entries = [(e.actor, e.action, e.target, e.reason) for e in audit_entries(platform)]
        assert entries == [(ACTOR, "job.cancel", f"job:{doomed}", "customer asked")]
        with pytest.raises(JobFinished, match="already ended"):
            control.cancel(doomed, actor=ACTOR)

        # a retry is a new job, linked to the cancelled one, that runs
        retried = control.retry(doomed, actor=ACTOR, reason="customer changed their mind")
        assert retried != doomed
        assert wait_state(platform, retried, "succeeded").retry_of == doomed
        assert len(runs.dones("doomed")) == 1
        assert job_row(platform, doomed).state == "cancelled"  # type: ignore[union-attr]


@pytest.mark.parametrize(("broker", "pool"), [("redis", "prefork"), ("rabbitmq", "threads")])
def test_running_job_cancelled_stops_and_is_recorded_revoked(
    broker: str, pool: str, tmp_path: Path
) -> None:
    """Prefork terminates the job's process; a thread pool cannot, so the job stops itself."""
    with control_platform(broker, tmp_path) as platform:
        control, runs = control_of(platform), platform.runs()
        platform.worker(pool=pool)
        long = submit(platform, "long", runs, duration=60)
        wait_for(lambda: runs.starts("long"), 30, what="the long job to start")
        wait_state(platform, long, "started")

        assert control.cancel(long, actor=ACTOR) == "terminating"

        job = wait_state(platform, long, "revoked", timeout=20)
        assert runs.dones("long") == []
        assert job.finished_at is not None
        expected = ["queued", "started", "revoked"]
        assert settled_event_states(platform, long, expected) == expected
        after = submit(platform, "after", runs)  # the worker goes on
        wait_state(platform, after, "succeeded")
        time.sleep(1)
        assert job_row(platform, long).state == "revoked"  # type: ignore[union-attr]
        assert platform.dead_letters().counts()["default"] == 0
        assert audit_entries(platform)[0].detail == {
            "state": "started",
            "outcome": "terminating",
            "worker": job.worker,
        }


def test_running_job_stops_by_itself_when_only_the_store_knows_it_was_cancelled(
    tmp_path: Path,
) -> None:
    """A worker that missed the broadcast: the job's own check reads the cancellation row."""
    with control_platform("redis", tmp_path) as platform:
        runs = platform.runs()
        platform.worker()
        long = submit(platform, "long", runs, duration=60)
        wait_for(lambda: runs.starts("long"), 30, what="the long job to start")
        insert(platform, JobCancellation(job_id=long, requested_at=datetime.now(UTC), actor="x"))

        wait_state(platform, long, "revoked", timeout=10)
        assert runs.dones("long") == []


def test_replayed_job_cancelled_while_running_is_recorded_revoked(tmp_path: Path) -> None:
    """The revoke of a job's second life outranks what its first life left in the history."""
    with control_platform("redis", tmp_path) as platform:
        control, runs = control_of(platform), platform.runs()
        platform.worker()
        job_id = submit(platform, "twice", runs, duration=2, fail_permanently=True)
        wait_state(platform, job_id, "dead")
        wait_for(lambda: platform.dead_letters().counts()["default"] == 1, 10,
                 what="the dead letter")  # fmt: skip
        platform.dead_letters().replay(task_id=job_id, actor=ACTOR)
        wait_for(lambda: len(runs.starts("twice")) == 2, 30, what="the replayed job to start")
        wait_state(platform, job_id, "started")

        assert control.cancel(job_id, actor=ACTOR) == "terminating"

        wait_state(platform, job_id, "revoked", timeout=20)
        assert event_states(platform, job_id)[-1] == "revoked"


# -- retry -----------------------------------------------------------------------------------------
def test_retry_of_a_dead_job_runs_a_new_linked_job_from_its_dead_letter(tmp_path: Path) -> None:
    with control_platform("redis", tmp_path) as platform:
        control, runs = control_of(platform), platform.runs()
        platform.worker()
        dead = submit(platform, "dead", runs, fail_permanently=True)
        wait_state(platform, dead, "dead")
        wait_for(lambda: platform.dead_letters().counts()["default"] == 1, 10,
                 what="the dead letter")  # fmt: skip

        retried = control.retry(dead, actor=ACTOR, reason="provider fixed")

        job = wait_state(platform, retried, "dead")  # the same payload fails the same way
        assert job.retry_of == dead  # the dead-lettering worker knows the link from the headers

        # the name and queue may come from the start, which the pool process may flush later
        def identity() -> tuple[str | None, str | None] | None:
            row = job_row(platform, retried)
            return None if row is None else (row.name, row.queue)

        wait_for(lambda: identity() == ("demo.work", "default"), 10, what="its name and queue")
        # the pool process records the start itself, maybe after the main process the death
        wait_for(lambda: "started" in event_states(platform, retried), 10, what="its start")
        assert len(runs.starts("dead")) == 2
        letters = platform.dead_letters().list("default")
        assert [letter.task_id for letter in letters] == [retried]  # the original's was used up
        actions = {e.action: e for e in audit_entries(platform)}
        assert actions["job.retry"].target == f"job:{dead}"
        assert actions["job.retry"].detail == {
            "new_job_id": retried,
            "state": "dead",
            "payload_from": "dead_letter",
        }
        assert actions["dlq.purge"].reason == f"retried as job {retried}"


# -- errors and housekeeping (no worker needed) ----------------------------------------------------
def test_operations_on_what_does_not_exist_or_cannot_be_done_raise_clear_errors(
    tmp_path: Path,
) -> None:
    with control_platform("embedded", tmp_path) as platform:
        control, runs = control_of(platform), platform.runs()
        insert(platform, Job(id="done-1", name="demo.work", queue="default", state="succeeded",
                             updated_at=datetime.now(UTC)))  # fmt: skip
        with pytest.raises(JobNotFound, match="no job with id 'nope'"):
            control.cancel("nope", actor=ACTOR)
        with pytest.raises(JobNotFound):
            control.retry("nope", actor=ACTOR)
        with pytest.raises(JobFinished, match=r"done-1 already ended \(succeeded\)"):
            control.cancel("done-1", actor=ACTOR)
        with pytest.raises(JobNotRetryable, match="done-1 is succeeded; only cancelled, dead"):
            control.retry("done-1", actor=ACTOR)
        with pytest.raises(UnknownQueue, match="unknown queue 'nope'; declared queues: ai"):
            control.pause("nope", actor=ACTOR)

        queued = submit(platform, "queued", runs)
        wait_state(platform, queued, "queued")
        with pytest.raises(JobNotRetryable, match="is queued"):
            control.retry(queued, actor=ACTOR)

        secret = str(platform.task("demo.sync_account").delay(
            account="acme", password="hunter2", api_key="k-1"
        ).id)  # fmt: skip
        wait_state(platform, secret, "queued")
        control.cancel(secret, actor=ACTOR)
        with pytest.raises(JobNotRetryable, match=r"redacted there \(api_key, password, phone\)"):
            control.retry(secret, actor=ACTOR)
        assert [e.action for e in audit_entries(platform)] == ["job.cancel"]  # refusals: no trace


def test_clean_removes_old_jobs_and_their_spent_cancellations_and_is_audited(
    tmp_path: Path,
) -> None:
    with control_platform("embedded", tmp_path) as platform:
        control = control_of(platform)
        old, now = datetime.now(UTC) - timedelta(days=10), datetime.now(UTC)
        insert(
            platform,
            Job(id="old", state="cancelled", updated_at=old, finished_at=old),
            Job(id="waiting", state="queued", updated_at=old, queued_at=old),
            Job(id="new", state="succeeded", updated_at=now, finished_at=now),
            JobCancellation(job_id="old", requested_at=old, actor="x"),
            JobCancellation(job_id="waiting", requested_at=old, actor="x"),
        )

        assert control.clean(timedelta(days=7), actor=ACTOR) == 1

        with Session(platform.history) as session:
            assert sorted(session.scalars(sqlalchemy.select(Job.id))) == ["new", "waiting"]
            kept = session.scalars(sqlalchemy.select(JobCancellation.job_id))
            assert list(kept) == ["waiting"]  # its job may still be delivered
        [entry] = audit_entries(platform)
        assert (entry.actor, entry.action, entry.target) == (ACTOR, "history.clean", "history")
        assert entry.detail is not None
        assert entry.detail["jobs_deleted"] == 1
        assert entry.detail["cancellations_deleted"] == 1
        assert entry.detail["older_than_seconds"] == 7 * 86400
