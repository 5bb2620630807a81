"""The writer merges transitions forward-only, whatever order the processes flush in."""

from __future__ import annotations

from history_db import T0, both_engines_fixture, row, write  # noqa: F401 - the engine fixture
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from tasks_platform.history.models import JobEvent, JobState
from tasks_platform.history.repository import as_utc
from tasks_platform.history.writer import Transition, apply_transitions


def test_a_start_flushed_after_the_dead_letter_still_fills_started_at(engine: Engine) -> None:
    write(engine, Transition("j", JobState.QUEUED, 1, T0, facts={"name": "demo.work"}))
    write(engine, Transition("j", JobState.DEAD, 1, T0 + 3, facts={"dead_reason": "x"}))
    write(engine, Transition("j", JobState.STARTED, 1, T0 + 1, worker="w1"),
          Transition("j", JobState.FAILED, 1, T0 + 2))  # fmt: skip

    job = row(engine)
    assert (job.state, job.attempts, job.worker) == ("dead", 1, "w1")
    assert job.started_at is not None
    assert as_utc(job.started_at).timestamp() == T0 + 1
    assert job.wait_seconds == 1.0
    with Session(engine) as session:
        assert session.scalar(select(JobEvent.id).where(JobEvent.state == "started")) is not None


def test_a_late_start_of_an_earlier_attempt_changes_nothing(engine: Engine) -> None:
    write(engine, Transition("j", JobState.STARTED, 2, T0 + 5, worker="w2"),
          Transition("j", JobState.SUCCEEDED, 2, T0 + 6))  # fmt: skip
    write(engine, Transition("j", JobState.STARTED, 1, T0 + 1, worker="w1"),
          Transition("j", JobState.QUEUED, 1, T0))  # fmt: skip

    job = row(engine)
    assert (job.state, job.attempts, job.worker) == ("succeeded", 2, "w2")
    assert job.started_at is not None
    assert as_utc(job.started_at).timestamp() == T0 + 5
    assert job.queued_at is not None
    assert as_utc(job.queued_at).timestamp() == T0


def test_the_same_transitions_written_twice_change_nothing(engine: Engine) -> None:
    batch = (
        Transition("j", JobState.QUEUED, 1, T0, facts={"name": "demo.work"}),
        Transition("j", JobState.STARTED, 1, T0 + 1, worker="w1"),
        Transition("j", JobState.SUCCEEDED, 1, T0 + 2, facts={"result": {"ok": True}}),
    )
    write(engine, *batch)
    write(engine, *batch)

    job = row(engine)
    assert (job.state, job.result, job.name) == ("succeeded", {"ok": True}, "demo.work")
    with Session(engine) as session:
        assert len(session.scalars(select(JobEvent)).all()) == 3


def test_a_line_read_twice_in_one_batch_counts_its_run_time_once(engine: Engine) -> None:
    """A writer process started again reads its segments from the start: the same events may
    come twice, in one batch or in two, for a job the history knows or not yet."""
    queued = Transition("k", JobState.QUEUED, 1, T0)
    write(engine, queued)
    for job_id in ("j", "k"):
        done = Transition(job_id, JobState.SUCCEEDED, 1, T0 + 2, facts={"run_seconds": 1.25})
        write(engine, done, done)
        write(engine, done)
        assert row(engine, job_id).run_seconds_total == 1.25
        with Session(engine) as session:
            events = session.scalars(select(JobEvent.state).where(JobEvent.job_id == job_id))
            assert list(events) == (["queued"] if job_id == "k" else []) + ["succeeded"]


def test_a_batch_on_a_table_never_analyzed_reads_jobs_by_index_only(engine: Engine) -> None:
    """A new (or truncated) table has no statistics: PostgreSQL took it for a small one and
    scanned all of it, twice per batch."""
    if engine.dialect.name != "postgresql":
        return  # SQLite plans by its own rules; nothing to check
    ids = [f"job-{n:05d}" for n in range(3000)]
    write(engine, *(Transition(i, JobState.QUEUED, 1, T0, facts={"name": "demo.work"})
                    for i in ids))  # fmt: skip
    batch = [Transition(i, JobState.STARTED, 1, T0 + 1, worker="w") for i in ids[:200]]
    seq_scans = text("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'jobs'")
    with Session(engine) as session, session.begin():
        before = session.scalar(seq_scans)
        apply_transitions(session, batch)
        assert session.scalar(seq_scans) == before
        # and the rest of the transaction plans as before
        assert session.scalar(text("SHOW enable_seqscan")) == "on"
    assert row(engine, ids[0]).state == "started"
    # a caller's own setting for its transaction is kept too
    with Session(engine) as session, session.begin():
        session.execute(text("SET LOCAL enable_seqscan = off"))
        apply_transitions(session, batch[:10])
        assert session.scalar(text("SHOW enable_seqscan")) == "off"


def test_a_batch_of_queued_only_is_merged_into_the_rows_already_there(engine: Engine) -> None:
    """A producer's batch (new jobs, mostly): the rows already there (a worker wrote first,
    or a dead job is replayed) are merged into, forward-only, as in any batch."""
    write(engine, Transition("done", JobState.STARTED, 1, T0 + 1, worker="w1"),
          Transition("done", JobState.SUCCEEDED, 1, T0 + 2))  # fmt: skip
    write(engine, Transition("dead", JobState.DEAD, 1, T0 + 3, facts={"dead_reason": "x"}))
    facts = {"name": "demo.work"}
    write(engine, Transition("done", JobState.QUEUED, 1, T0, facts=facts),
          Transition("dead", JobState.QUEUED, 1, T0 + 4, replays=1, facts=facts),
          Transition("new", JobState.QUEUED, 1, T0, facts=facts))  # fmt: skip

    done = row(engine, "done")
    assert (done.state, done.name, done.worker, done.wait_seconds) == (
        "succeeded", "demo.work", "w1", 1.0)  # fmt: skip
    assert done.queued_at is not None
    assert as_utc(done.queued_at).timestamp() == T0
    dead = row(engine, "dead")
    assert (dead.state, dead.name, dead.finished_at) == ("queued", "demo.work", None)
    assert (row(engine, "new").state, row(engine, "new").name) == ("queued", "demo.work")
    with Session(engine) as session:
        events = session.scalars(select(JobEvent.state).where(JobEvent.job_id == "done"))
        assert sorted(events) == ["queued", "started", "succeeded"]
