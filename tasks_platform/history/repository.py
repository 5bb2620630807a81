"""Reading (and pruning) the job history: :class:`JobRepository`.

The repository takes a :class:`~sqlalchemy.orm.Session` and never commits: the caller owns
the transaction. Every query is portable between PostgreSQL and SQLite.

Listings are paginated by *keyset*, newest first: rows are ordered by ``(queued_at DESC,
id DESC)`` with the rows that have no ``queued_at`` last, and a page ends with an opaque,
URL-safe cursor that encodes the ``(queued_at, id)`` of its last row. The next page starts
strictly after that row, so rows inserted meanwhile never shift a page nor repeat one.

SQLite keeps no time zone: timestamps come back naive and are read as UTC, which is what the
recorder writes; every datetime given to the repository is converted to UTC first.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, inspect, or_, select
from sqlalchemy.orm import Session

from tasks_platform.errors import InvalidPayload
from tasks_platform.history.models import (
    TERMINAL_STATES,
    UNSUCCESSFUL_STATES,
    Base,
    Job,
    JobEvent,
    JobState,
)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: states of a job that is still going (or going again after a replay): never pruned
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.STARTED, JobState.RETRYING})


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def row_as_dict(row: Base) -> dict[str, Any]:
    """A history row (job or event) as JSON-ready values, datetimes in ISO 8601 UTC."""
    values: dict[str, Any] = {}
    for attribute in inspect(row).mapper.column_attrs:
        value = getattr(row, attribute.key)
        values[attribute.key] = as_utc(value).isoformat() if isinstance(value, datetime) else value
    return values


@dataclass(frozen=True)
class Page:
    """One page of jobs; ``next_cursor`` is None on the last page."""

    items: builtins.list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class Cursor:
    """The position after which the next page starts (its last row's sort key)."""

    queued_at: datetime | None
    id: str

    def encode(self) -> str:
        moment = None if self.queued_at is None else as_utc(self.queued_at).isoformat()
        raw = json.dumps([moment, self.id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            moment, job_id = json.loads(raw)
            queued_at = None if moment is None else as_utc(datetime.fromisoformat(moment))
        except (binascii.Error, ValueError, TypeError) as exc:
            raise InvalidPayload(f"malformed page cursor {text!r}") from exc
        if not isinstance(job_id, str):
            raise InvalidPayload(f"malformed page cursor {text!r}")
        return cls(queued_at=queued_at, id=job_id)


class JobRepository:
    """Queries over ``jobs`` and ``job_events``; the caller commits."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, job_id: str) -> tuple[Job, builtins.list[JobEvent]] | None:
        """The job and its transitions in order (by time, then id), or None if unknown."""
        job = self.session.get(Job, job_id)
        if job is None:
            return None
        events = self.session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.at, JobEvent.id)
        ).all()
        return job, builtins.list(events)

    def list(
        self,
        *,
        states: Iterable[str] | None = None,
        queue: str | None = None,
        name: str | None = None,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = DEFAULT_LIMIT,
        after: str | None = None,
    ) -> Page:
        """Jobs matching every filter given, newest first; ``since``/``until`` bound queued_at.

        ``since`` is inclusive and ``until`` exclusive; ``after`` is the ``next_cursor`` of the
        previous page. A malformed cursor raises :class:`~tasks_platform.errors.InvalidPayload`.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
        conditions = _filters(
            states=states, queue=queue, name=name, tenant=tenant, since=since, until=until
        )
        if after is not None:
            conditions.append(_after(Cursor.decode(after)))
        query = (
            select(Job)
            .where(*conditions)
            .order_by(Job.queued_at.desc().nulls_last(), Job.id.desc())
            .limit(limit + 1)
        )
        rows = builtins.list(self.session.scalars(query).all())
        if len(rows) <= limit:
            return Page(items=rows, next_cursor=None)
        last = rows[limit - 1]
        return Page(items=rows[:limit], next_cursor=Cursor(last.queued_at, last.id).encode())

    def unsuccessful(self, **filters: Any) -> Page:
        """Like :meth:`list`, restricted to jobs that failed or are dead."""
        return self.list(states=sorted(UNSUCCESSFUL_STATES), **filters)

    def counts_by_state(self, *, since: datetime | None = None) -> dict[str, int]:
        """How many jobs are in each state (queued at or after ``since``, when given)."""
        query = select(Job.state, func.count()).group_by(Job.state)
        if since is not None:
            query = query.where(Job.queued_at >= as_utc(since))
        return {state: int(count) for state, count in self.session.execute(query).all()}

    def delete_older_than(self, cutoff: datetime) -> int:
        """Delete jobs (and their events) that ended before ``cutoff``; returns jobs deleted.

        A job ended when it finished (``finished_at``) or, if it never finished but is in a
        terminal state (cancelled, revoked, expired ...), when it was last updated. A job that
        is active again (replayed: queued, started or retrying) is kept whatever its dates.
        """
        old = _ended_before(as_utc(cutoff))
        doomed = select(Job.id).where(old)
        # explicitly, not by ON DELETE CASCADE: SQLite enforces it only with foreign_keys=ON
        self.session.execute(
            delete(JobEvent).where(JobEvent.job_id.in_(doomed)),
            execution_options={"synchronize_session": False},
        )
        result = self.session.execute(
            delete(Job).where(old), execution_options={"synchronize_session": False}
        )
        return int(getattr(result, "rowcount", 0))


def _filters(
    *,
    states: Iterable[str] | None,
    queue: str | None,
    name: str | None,
    tenant: str | None,
    since: datetime | None,
    until: datetime | None,
) -> builtins.list[ColumnElement[bool]]:
    conditions: builtins.list[ColumnElement[bool]] = []
    if states is not None:
        conditions.append(Job.state.in_([str(state) for state in states]))
    for column, value in ((Job.queue, queue), (Job.name, name), (Job.tenant, tenant)):
        if value is not None:
            conditions.append(column == value)
    if since is not None:
        conditions.append(Job.queued_at >= as_utc(since))
    if until is not None:
        conditions.append(Job.queued_at < as_utc(until))
    return conditions


def _after(cursor: Cursor) -> ColumnElement[bool]:
    """Rows that sort after ``cursor`` in (queued_at DESC NULLS LAST, id DESC) order."""
    if cursor.queued_at is None:
        return and_(Job.queued_at.is_(None), Job.id < cursor.id)
    return or_(
        Job.queued_at < cursor.queued_at,
        and_(Job.queued_at == cursor.queued_at, Job.id < cursor.id),
        Job.queued_at.is_(None),
    )


def _ended_before(cutoff: datetime) -> ColumnElement[bool]:
    never_finished_but_over = and_(
        Job.finished_at.is_(None),
        Job.state.in_([str(state) for state in TERMINAL_STATES]),
        Job.updated_at < cutoff,
    )
    return and_(
        or_(Job.finished_at < cutoff, never_finished_but_over),
        Job.state.not_in([str(state) for state in ACTIVE_STATES]),
    )
