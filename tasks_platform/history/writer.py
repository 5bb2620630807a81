"""Writing transitions into the history: one batch, one transaction, forward-only.

A batch is applied in a few statements: a locked read of the rows the batch's jobs already
have (ordered by id, so two writers never deadlock), one insert of the merged rows of jobs not
seen yet, one insert of the events, and one update of the other rows (on PostgreSQL each of
them takes its rows as one JSON document). Identity facts (name, queue, args ...) are filled
by whichever transition knows them first; the state and what comes with it (times, result,
error) only move forward, by :func:`~tasks_platform.history.models.progress`. Applying the
same transitions twice changes nothing: events are keyed by their own id.

Progress reports (``Transition.report``) set only ``percent`` and ``progress_note``: the latest
report of the row's current attempt wins, reports of an earlier attempt are ignored, and a row
entering a new attempt forgets the last one's. They leave no event (a job may report often).
Each attempt's run time is added to ``run_seconds_total`` once: for the transitions whose event
row this batch inserted (the events go in before the rows they update), so a batch written
again adds nothing, whatever the order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, Table, any_, bindparam, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from tasks_platform.history.encoding import dump_line, dumps, loads
from tasks_platform.history.models import TERMINAL_STATES, Job, JobEvent, JobState, progress

#: facts that identify a job: the first transition that knows one sets it
IDENTITY = ("name", "queue", "priority", "tenant", "max_retries", "args", "kwargs",
            "parent_id", "root_id", "group_id", "idempotency_key", "retry_of")  # fmt: skip
#: facts that describe an outcome: the latest state's transition sets them
OUTCOME = ("result", "error_type", "error_message", "error_traceback", "dead_reason",
           "run_seconds", "prompt_tokens", "completion_tokens")  # fmt: skip
#: the facts a progress report sets
REPORTED = ("percent", "progress_note")


#: Core tables: the ORM's bulk paths fell back to a statement per row
_JOBS: Table = Job.__table__  # type: ignore[assignment]
_EVENTS: Table = JobEvent.__table__  # type: ignore[assignment]
_COLUMNS = [column.name for column in _JOBS.columns if column.name != "id"]
_IDS = postgresql.ARRAY(String)
#: the setting as it was (the select list is evaluated in order), then off for this transaction
_SEQSCAN_OFF = text(
    "SELECT current_setting('enable_seqscan'), set_config('enable_seqscan', 'off', true)"
)
_SEQSCAN_RESTORE = text("SELECT set_config('enable_seqscan', :before, true)")
_UPDATE_ROW = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("row_id"))
    .values({name: bindparam(f"new_{name}") for name in _COLUMNS})
)


@dataclass(frozen=True)
class Transition:
    """Something that happened to a job, as recorded by one process."""

    job_id: str
    state: JobState
    attempt: int
    at: float  #: unix time
    replays: int = 0
    worker: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)
    detail: Mapping[str, Any] | None = None
    #: 32 random hex digits, like a uuid4's (without the cost of building a UUID)
    event_id: str = field(default_factory=lambda: os.urandom(16).hex())
    #: a progress report of the attempt (``percent``, ``progress_note``), not a state change
    report: bool = False

    @property
    def progress(self) -> int:
        return progress(self.state, attempt=self.attempt, replays=self.replays)

    def to_json(self) -> str:
        return self.to_line()[:-1].decode()

    def to_line(self) -> bytes:
        """The transition as a line of JSON (UTF-8, ending with a newline)."""
        return dump_line(
            {"job_id": self.job_id, "state": self.state.value, "attempt": self.attempt,
             "at": self.at, "replays": self.replays, "worker": self.worker,
             "facts": dict(self.facts), "detail": self.detail, "event_id": self.event_id,
             "report": self.report}
        )  # fmt: skip

    @classmethod
    def from_json(cls, line: str | bytes) -> Transition:
        data = loads(line)
        data["state"] = _STATES[data["state"]]  # not JobState(...): its lookup by value is slow
        return cls(**data)


_STATES = {state.value: state for state in JobState}


def apply_transitions(session: Session, transitions: Iterable[Transition]) -> None:
    """Write ``transitions`` (any jobs, any order) in the caller's transaction."""
    by_job: dict[str, list[Transition]] = {}
    for transition in transitions:
        by_job.setdefault(transition.job_id, []).append(transition)
    if not by_job:
        return
    now = datetime.now(UTC)
    dialect = session.get_bind().dialect.name
    ids = sorted(by_job)  # rows are always locked in id order, so two writers never deadlock
    if dialect == "sqlite":
        # the driver opens a transaction only at the first write, and SQLite has no row locks:
        # take the database's write lock before reading, so that no other process commits
        # between this read and this write (which would then undo what that process wrote)
        session.execute(text(f"UPDATE {_JOBS.name} SET id = id WHERE 0"))  # noqa: S608
    with _index_scans(session, dialect):
        _apply(session, dialect, ids, by_job, now)


def _apply(session: Session, dialect: str, ids: list[str], by_job: dict[str, list[Transition]],
           now: datetime) -> None:  # fmt: skip
    known = _locked_rows(session, dialect, ids)
    events = _unique([t for t in by_job_order(by_job) if not t.report])
    unseen = [job_id for job_id in ids if job_id not in known]
    if unseen:  # new jobs: their merged rows go in as they are, in one statement
        fresh = [_merge(_blank(job_id), by_job[job_id], now) for job_id in unseen]
        for row in fresh:  # no event of a job without a row is written yet: all of them count
            row["run_seconds_total"] = _run_seconds(_unique(by_job[row["id"]]))
        inserted = _insert(session, dialect, _JOBS, fresh, returning=True)
        raced = [job_id for job_id in unseen if job_id not in inserted]
        if raced:  # another writer inserted them meanwhile: merge into its rows instead
            known.update(_locked_rows(session, dialect, raced))
    # each attempt's run time counts once: with its event's first write
    timed = any(t.job_id in known and t.facts.get("run_seconds") is not None for t in events)
    rows = [_event_row(t) for t in events]
    new_events = _insert(session, dialect, _EVENTS, rows, returning=timed) if rows else set()
    if known:
        merged = []
        for job_id in sorted(known):
            row = _merge(known[job_id], by_job[job_id], now)
            seconds = _run_seconds(_unique([t for t in by_job[job_id] if t.event_id in new_events]))
            if seconds is not None:
                row["run_seconds_total"] = (row.get("run_seconds_total") or 0.0) + seconds
            merged.append(row)
        _update(session, dialect, merged)


@contextmanager
def _index_scans(session: Session, dialect: str) -> Iterator[None]:
    """PostgreSQL: no sequential scans meanwhile. Every statement of a batch finds its rows by
    primary key, for which an index scan is always the right plan; but a table never analyzed
    (new, or just truncated) or with stale statistics looks small, and PostgreSQL then scanned
    all of it, twice per batch. The rest of the caller's transaction plans as before (with
    the setting it had, its own ``SET LOCAL`` included)."""
    if dialect != "postgresql":
        yield
        return
    before = session.execute(_SEQSCAN_OFF).one()[0]
    yield
    session.execute(_SEQSCAN_RESTORE, {"before": before})


def _unique(transitions: list[Transition]) -> list[Transition]:
    """``transitions`` without the repeats of an event (a line read twice)."""
    return list({t.event_id: t for t in transitions}.values())


def _run_seconds(transitions: Iterable[Transition]) -> float | None:
    """The run time of the attempts ``transitions`` end (None if none of them says)."""
    total = None
    for t in transitions:
        seconds = None if t.report else t.facts.get("run_seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            total = (total or 0.0) + float(seconds)
    return total


def _insert(
    session: Session, dialect: str, table: Table, rows: list[dict[str, Any]], *,
    returning: bool = False,
) -> set[str]:  # fmt: skip
    """Insert ``rows``, skipping ids already there; the ids inserted if ``returning``."""
    if dialect == "postgresql":  # a parameter per column, whatever the number of rows
        names = ", ".join(column.name for column in table.columns)
        rowset, parameters = _unnest(table, rows)
        # names from the table's metadata; every value is a bound parameter
        sql = (f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {rowset} "  # noqa: S608
               f"ON CONFLICT (id) DO NOTHING{' RETURNING id' if returning else ''}")  # fmt: skip
        result = session.execute(text(sql), parameters)
        return set(result.scalars()) if returning else set()
    statement = _insert_ignoring_duplicates(dialect, table).returning(table.c.id)
    return set(session.scalars(statement, rows))  # RETURNING: rows are sent in batches


def _update(session: Session, dialect: str, rows: list[dict[str, Any]]) -> None:
    if dialect == "postgresql":
        rowset, parameters = _unnest(_JOBS, rows)
        assignments = ", ".join(f"{name} = v.{name}" for name in _COLUMNS)
        where = f"{_JOBS.name}.id = v.id"
        sql = f"UPDATE {_JOBS.name} SET {assignments} FROM {rowset} WHERE {where}"  # noqa: S608
        session.execute(text(sql), parameters)
        return
    session.execute(_UPDATE_ROW, [_update_parameters(row) for row in rows])


def _unnest(table: Table, rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The rows of ``rows`` as ``v`` (PostgreSQL), all from one JSON document.

    Thousands of scalar parameters, or arrays of them, cost more to convert client-side than
    the server takes to write the rows; one JSON text (orjson) costs next to nothing. A JSON
    ``null`` is an SQL NULL, in every column.
    """
    return _RECORDSETS[table.name], {"rows": dumps(rows)}


def _recordset(table: Table) -> str:
    """``(SELECT ...) AS v``: the rows of a ``:rows`` JSON array of objects, each value cast to
    its column's type (a text longer than its column is cut, as a cast does)."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    declared, selected = [], []
    for column in table.columns:
        kind = column.type.compile(dialect)
        loose = "TEXT" if kind.startswith("VARCHAR") else kind
        declared.append(f"{column.name} {loose}")
        selected.append(f"CAST(r.{column.name} AS {kind}) AS {column.name}")
    # names and types from the table's metadata; the rows are one bound parameter
    return (f"(SELECT {', '.join(selected)} FROM json_to_recordset(CAST(:rows AS json)) "  # noqa: S608
            f"AS r({', '.join(declared)})) AS v")  # fmt: skip


_RECORDSETS = {table.name: _recordset(table) for table in (_JOBS, _EVENTS)}


def _locked_rows(session: Session, dialect: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    query = select(_JOBS).order_by(_JOBS.c.id)
    if dialect == "postgresql":
        # one array parameter: a list of hundreds of parameters costs PostgreSQL more to
        # parse and plan than the rows cost to read
        query = query.where(_JOBS.c.id == any_(bindparam("ids", ids, type_=_IDS)))
        query = query.with_for_update()
    else:
        query = query.where(_JOBS.c.id.in_(ids))
    return {row["id"]: dict(row) for row in session.execute(query).mappings()}


def _blank(job_id: str) -> dict[str, Any]:
    """The row of a job nothing is known of yet (every column, so rows insert together)."""
    row: dict[str, Any] = dict.fromkeys(_COLUMNS)
    row.update(id=job_id, state=JobState.QUEUED.value, progress=-1, attempts=0)
    return row


def _update_parameters(row: dict[str, Any]) -> dict[str, Any]:
    return {"row_id": row["id"], **{f"new_{name}": row[name] for name in _COLUMNS}}


def by_job_order(by_job: Mapping[str, list[Transition]]) -> list[Transition]:
    return [t for job_id in sorted(by_job) for t in by_job[job_id]]


def _insert_ignoring_duplicates(dialect: str, table: Table) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=["id"])
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=["id"])
    return insert(table).prefix_with("IGNORE")


def _merge(row: dict[str, Any], transitions: list[Transition], now: datetime) -> dict[str, Any]:
    for t in transitions:
        if t.report:
            _reported(row, t)
            continue
        for key in IDENTITY:
            if row.get(key) is None and t.facts.get(key) is not None:
                row[key] = t.facts[key]
        queued_at = t.facts.get("queued_at", t.at if t.state is JobState.QUEUED else None)
        if queued_at is not None:
            moment = _time(queued_at)
            current = _aware(row.get("queued_at"))
            row["queued_at"] = moment if current is None else min(current, moment)
        if t.state is JobState.STARTED:
            _started(row, t)
        if t.progress > row["progress"]:
            _advance(row, t)
    started, queued = _aware(row.get("started_at")), _aware(row.get("queued_at"))
    if row.get("wait_seconds") is None and started and queued:
        row["wait_seconds"] = max((started - queued).total_seconds(), 0.0)
    row["updated_at"] = now
    return row


def _started(row: dict[str, Any], t: Transition) -> None:
    """The start of the row's latest attempt, even when a later state of that attempt arrived
    first (the pool process that started a job may flush after the main process recorded it
    dead). ``progress // 10`` numbers an attempt across replays."""
    row["attempts"] = max(row.get("attempts") or 0, t.attempt)
    if t.progress // 10 < row["progress"] // 10:
        return  # the start of an earlier attempt
    moment, current = _time(t.at), _aware(row.get("started_at"))
    if current is None or moment > current:
        row["started_at"], row["worker"] = moment, t.worker or row.get("worker")


def _reported(row: dict[str, Any], t: Transition) -> None:
    """A progress report: kept if it is of the row's current attempt (the latest one wins)."""
    if t.progress // 10 != row["progress"] // 10:
        return  # of an earlier attempt, or of one whose start is not written yet
    for key in REPORTED:
        row[key] = t.facts.get(key)


def _advance(row: dict[str, Any], t: Transition) -> None:
    if t.progress // 10 != row["progress"] // 10:  # a new attempt: the last one's report is old
        row["percent"] = row["progress_note"] = None
    row["state"], row["progress"] = t.state.value, t.progress
    if t.state is JobState.QUEUED:  # a replay starts over
        row["finished_at"] = None
    if t.state is JobState.SUCCEEDED:  # the errors of earlier attempts are in the events
        row["error_type"] = row["error_message"] = row["error_traceback"] = None
    if t.state in TERMINAL_STATES or t.state in (JobState.FAILED, JobState.RETRYING):
        for key in OUTCOME:
            if key in t.facts:
                row[key] = t.facts[key]
        if t.worker and not row.get("worker"):
            row["worker"] = t.worker
    if t.state in TERMINAL_STATES or t.state is JobState.FAILED:
        row["finished_at"] = _time(t.at)


def _event_row(t: Transition) -> dict[str, Any]:
    return {"id": t.event_id, "job_id": t.job_id, "state": t.state.value, "attempt": t.attempt,
            "at": _time(t.at), "worker": t.worker,
            "detail": dict(t.detail) if t.detail else None}  # fmt: skip


def _time(value: float | str | datetime) -> datetime:
    if isinstance(value, datetime):
        return _aware(value) or value
    if isinstance(value, str):
        return _aware(datetime.fromisoformat(value)) or datetime.now(UTC)
    return datetime.fromtimestamp(value, UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)  # SQLite gives back naive UTC
