"""Usage metering: per day, tenant and job type, the jobs that ended and what they consumed.

Read from the job history: a job counts on the UTC day it ended (``finished_at``), with its
state then, its attempts, the run time of all its attempts (``run_seconds_total``) and the LLM
tokens its result reported (``prompt_tokens``, ``completion_tokens``). Jobs still queued or
running are not counted yet; a replayed job counts again on the day it ends again. Usage lives
as long as the history rows do: the retention cleanup removes it with them.

The sums are made by the database; only the day bucketing differs between PostgreSQL and
SQLite (``finished_at`` is a ``timestamptz`` on one and naive-UTC text on the other).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Date, case, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from tasks_platform.history.models import TERMINAL_STATES, Job, JobState

#: the job type reported for jobs the history knows no name of
UNKNOWN_JOB = "unknown"
#: the longest range one query covers
MAX_DAYS = 366
#: states a job has ended in (failed: on its way to its dead-letter queue)
ENDED_STATES = frozenset({*TERMINAL_STATES, JobState.FAILED})
_FAILED = (JobState.FAILED, JobState.DEAD)
_STOPPED = (JobState.CANCELLED, JobState.REVOKED, JobState.EXPIRED)


@dataclass(frozen=True)
class UsageRow:
    """What one tenant's jobs of one type used on one day."""

    day: date
    tenant: str | None
    job: str
    #: jobs that ended that day, and how: succeeded, failed (dead-lettered), cancelled
    #: (cancelled, revoked or expired)
    jobs: int
    succeeded: int
    failed: int
    cancelled: int
    attempts: int
    run_seconds: float
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["day"] = self.day.isoformat()
        return values


def usage_rows(
    session: Session,
    *,
    since: date,
    until: date,
    tenant: str | None = None,
    job: str | None = None,
) -> list[UsageRow]:
    """Usage per day, tenant and job type, ``since`` to ``until`` (UTC days, both included)."""
    check_range(since, until)
    day = _day(session.get_bind().dialect.name)
    ended = func.count()
    query = (
        select(
            day.label("day"),
            Job.tenant,
            Job.name,
            ended,
            _count(Job.state == JobState.SUCCEEDED.value),
            _count(Job.state.in_([state.value for state in _FAILED])),
            _count(Job.state.in_([state.value for state in _STOPPED])),
            func.coalesce(func.sum(Job.attempts), 0),
            func.coalesce(func.sum(func.coalesce(Job.run_seconds_total, Job.run_seconds)), 0.0),
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
        )
        .where(
            Job.finished_at >= _midnight(since),
            Job.finished_at < _midnight(until + timedelta(days=1)),
            Job.state.in_([state.value for state in ENDED_STATES]),
        )
        .group_by(day, Job.tenant, Job.name)
    )
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if job is not None:
        query = query.where(Job.name == job)
    rows = [_row(values) for values in session.execute(query)]
    return sorted(rows, key=lambda r: (r.day, r.tenant or "", r.job))


def check_range(since: date, until: date) -> None:
    if until >= date.max:
        raise ValueError(f"the range must end before {date.max}")
    if until < since:
        raise ValueError(f"the range ends ({until}) before it starts ({since})")
    if (until - since).days >= MAX_DAYS:
        raise ValueError(f"the range covers more than {MAX_DAYS} days")


def last_days(days: int, *, today: date | None = None) -> tuple[date, date]:
    """The range of the last ``days`` UTC days, today included."""
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    today = today or datetime.now(UTC).date()
    return today - timedelta(days=days - 1), today


def _day(dialect: str) -> ColumnElement[Any]:
    """The UTC date of ``finished_at``."""
    if dialect == "postgresql":
        return cast(func.timezone("UTC", Job.finished_at), Date)
    return func.date(Job.finished_at)  # SQLite keeps naive UTC text: 'YYYY-MM-DD HH:MM:SS...'


def _count(condition: ColumnElement[bool]) -> ColumnElement[Any]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _row(values: Any) -> UsageRow:
    (day, tenant, name, jobs, succeeded, failed, cancelled, attempts, run, prompt,
     completion) = values  # fmt: skip
    return UsageRow(
        day=day if isinstance(day, date) else date.fromisoformat(str(day)),
        tenant=tenant,
        job=name or UNKNOWN_JOB,
        jobs=int(jobs),
        succeeded=int(succeeded),
        failed=int(failed),
        cancelled=int(cancelled),
        attempts=int(attempts),
        run_seconds=float(run),
        prompt_tokens=int(prompt),
        completion_tokens=int(completion),
    )
