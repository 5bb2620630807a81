"""The history schema: one row per job, and an append-only log of its transitions.

Works on PostgreSQL (production) and SQLite (the embedded default). Constraint and index
names follow one naming convention so that Alembic migrations stay stable.

Forward-only writes rest on :func:`progress`: every transition has a number that only grows
along a job's life (replays, then attempts, then the rank of the state within an attempt). A
row takes a transition's state only if its number is higher than the row's, so a late
``queued`` can never overwrite ``succeeded``, whatever order the processes write in.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobState(StrEnum):
    """Where a job is in its life.

    (pending ->) queued -> started -> (retrying -> started)* -> succeeded | failed -> dead;
    cancelled (never ran), revoked (stopped by an operator), expired (ran out of time to start).
    """

    PENDING = "pending"  #: accepted in the outbox, not yet published (see tasks_platform.outbox)
    QUEUED = "queued"  #: accepted by the broker, waiting for a worker
    STARTED = "started"  #: a worker is running it
    RETRYING = "retrying"  #: failed transiently; will run again after a delay
    SUCCEEDED = "succeeded"  #: finished successfully
    FAILED = "failed"  #: failed for good; being dead-lettered
    DEAD = "dead"  #: in its dead-letter queue
    CANCELLED = "cancelled"  #: cancelled before it ran
    REVOKED = "revoked"  #: stopped by an operator while queued or running
    EXPIRED = "expired"  #: its expiry passed before a worker took it


#: states after which nothing more happens to a job (unless an operator replays it)
TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED, JobState.REVOKED, JobState.EXPIRED}
)
#: states of jobs that did not succeed
UNSUCCESSFUL_STATES = frozenset({JobState.FAILED, JobState.DEAD})

_RANK = {
    JobState.PENDING: -1,
    JobState.QUEUED: 0,
    JobState.STARTED: 1,
    JobState.RETRYING: 2,
    JobState.SUCCEEDED: 5,
    JobState.FAILED: 6,
    JobState.DEAD: 7,
    JobState.CANCELLED: 8,
    JobState.REVOKED: 8,
    JobState.EXPIRED: 8,
}


def progress(state: JobState, *, attempt: int, replays: int = 0) -> int:
    """The ordering number of a transition (higher = later in the job's life)."""
    return replays * 100_000 + min(max(attempt, 0), 9_999) * 10 + _RANK[state]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    """One job, as last known."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    queue: Mapped[str | None] = mapped_column(String(200))
    priority: Mapped[str | None] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    progress: Mapped[int] = mapped_column(BigInteger, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_retries: Mapped[int | None] = mapped_column(Integer)
    args: Mapped[list[Any] | None] = mapped_column(JSON)
    kwargs: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[Any | None] = mapped_column(JSON)
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)
    dead_reason: Mapped[str | None] = mapped_column(String(40))
    worker: Mapped[str | None] = mapped_column(String(255))
    parent_id: Mapped[str | None] = mapped_column(String(64))
    root_id: Mapped[str | None] = mapped_column(String(64))
    group_id: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    #: the job this one was retried from by an operator
    retry_of: Mapped[str | None] = mapped_column(String(64))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    wait_seconds: Mapped[float | None] = mapped_column(Float)
    run_seconds: Mapped[float | None] = mapped_column(Float)
    #: what the job reported of its own progress (JobContext.report_progress)
    percent: Mapped[float | None] = mapped_column(Float)
    progress_note: Mapped[str | None] = mapped_column(String(500))
    #: run time of every attempt together (usage metering)
    run_seconds_total: Mapped[float | None] = mapped_column(Float)
    #: LLM token usage of the job's last run (from its result's ``usage``)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    #: True: a job with an idempotency key whose publish failed in a way that may have queued
    #: it; a submission with the key publishes it again (tasks_platform.intake)
    publish_uncertain: Mapped[bool | None] = mapped_column(Boolean)
    #: the publish (x-tasks-publish) of the first delivery of a keyed job a worker ran; a
    #: delivery of another publish of the job is a duplicate
    delivered_by: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(None, "state", "queued_at"),
        Index(None, "queue", "queued_at"),
        Index(None, "name", "queued_at"),
        Index(None, "tenant", "queued_at"),
        Index(None, "queued_at", "id"),
        Index(None, "finished_at"),
        Index(None, "root_id"),
        Index(None, "idempotency_key"),
        Index(None, "retry_of"),
    )


class JobEvent(Base):
    """One transition of one job; never updated, removed only with its job."""

    __tablename__ = "job_events"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (Index(None, "job_id", "at"), Index(None, "at"))


class JobCancellation(Base):
    """A job an operator cancelled: every worker discards it, including workers started later."""

    __tablename__ = "job_cancellations"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index(None, "requested_at"),)


class QueuePause(Base):
    """A paused work queue: no worker consumes it until it is resumed."""

    __tablename__ = "queue_pauses"

    queue: Mapped[str] = mapped_column(String(200), primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)


class AuditEntry(Base):
    """One operator action: who did what to which target, when and why. Never updated."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(400))
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (Index(None, "at"), Index(None, "action", "at"))


class ApiToken(Base):
    """A bearer token of the admin API; only the SHA-256 of its secret is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StatsSnapshot(Base):
    """The stats module's figures at one moment, taken by the scheduled snapshot job."""

    __tablename__ = "stats_snapshots"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    figures: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (Index(None, "at"),)


class OutboxMessage(Base):
    """A job accepted in the caller's transaction, with the message the relay publishes.

    ``published_at`` is None while the job waits for the relay (pending); the row stays after
    publishing so that a second delivery of the same job can be recognised
    (``delivered_by``: the publish the first worker took) until the relay prunes it.
    """

    __tablename__ = "outbox"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  #: the job (task) id
    name: Mapped[str] = mapped_column(String(200))
    #: the Celery signature to publish: task, args, kwargs, options (queue, priority, eta ...)
    message: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: publishes tried (a relay that died before committing leaves a row tried and pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: the publish id of the first delivery a worker ran (duplicates carry another one)
    delivered_by: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index(None, "published_at", "created_at"),)
