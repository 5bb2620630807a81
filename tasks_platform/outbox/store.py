"""The outbox table: writing jobs into the caller's transaction, and reading them back.

:func:`enqueue` validates a job exactly as ``apply_async`` does (payload, tenant, priority,
idempotency key), then adds two rows to the caller's :class:`~sqlalchemy.orm.Session`: the
job's history row (state ``pending``) and an outbox row holding the complete message (a Celery
signature: task name, id, args/kwargs, headers, queue, priority, eta). It never commits: the
job exists if and only if the caller's transaction commits. On PostgreSQL it also sends
``NOTIFY`` on :data:`CHANNEL`, which PostgreSQL delivers only at commit: that wakes the relay.

The relay (:mod:`tasks_platform.outbox.relay`) publishes pending rows and marks them
published; :func:`pending` is what the reconciler reads as the source of truth.
"""

from __future__ import annotations

import json
import uuid
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Table, delete, false, func, make_url, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from tasks_platform.errors import ConfigurationError, IdempotencyConflict, InvalidPayload
from tasks_platform.history.models import Job, JobState, OutboxMessage
from tasks_platform.history.recorder import job_facts
from tasks_platform.jobs.declaration import (
    IDEMPOTENCY_KEY_HEADER,
    PRIORITY_HEADER,
    TENANT_HEADER,
    check_tenant,
)

if TYPE_CHECKING:
    from tasks_platform.intake import Submitted
    from tasks_platform.jobs.declaration import PlatformTask

#: the PostgreSQL channel the relay LISTENs on (one per database: payload-less wake-ups)
CHANNEL = "tasks_platform_outbox"
#: header the relay stamps on each publish: a fresh id per publish, kept by redeliveries
OUTBOX_HEADER = "x-tasks-outbox"

#: session.info key: the transaction that already sent its NOTIFY
_NOTIFIED = "tasks_platform.outbox.notified"

_JOBS: Table = Job.__table__  # type: ignore[assignment]
_OUTBOX: Table = OutboxMessage.__table__  # type: ignore[assignment]


def enqueue(
    session: Session,
    task: PlatformTask,
    args: tuple[Any, ...] | list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    options: dict[str, Any] | None = None,
) -> Submitted:
    """Add job ``task(*args, **kwargs)`` to the outbox in ``session``'s transaction (no commit).

    ``options`` are ``apply_async`` options (``tenant``, ``priority``, ``countdown``, ``eta``,
    ``task_id``, ``headers`` ...). With an idempotency ``key`` a repeat (same tenant) returns
    the first job's id with ``created=False``. InvalidPayload refuses a bad payload, tenant,
    key or option; IdempotencyConflict a key used for another job type.
    """
    from tasks_platform.intake import Submitted, check_key, idempotent_id  # noqa: PLC0415

    options = dict(options or {})
    _refuse_unstorable(options)
    tenant = options.pop("tenant", None)
    check_tenant(tenant)
    job_id = options.pop("task_id", None)
    headers = dict(options.pop("headers", None) or {})
    if tenant is not None:
        headers[TENANT_HEADER] = tenant
    if key is not None:
        check_key(key)
        derived = idempotent_id(tenant, key)
        if job_id is not None and job_id != derived:
            raise InvalidPayload("give a job an idempotency key or a task id, not both")
        job_id, headers[IDEMPOTENCY_KEY_HEADER] = derived, key
    job_id = str(job_id or uuid.uuid4())
    options["headers"] = headers
    args, kwargs, options = task.publish_options(args or (), kwargs or {}, options)
    now = datetime.now(UTC)
    message = _message(task, job_id, args, kwargs, options, now)
    dialect = check_session(session, task.app.settings.effective_database_url)
    if not _insert(session, dialect, _JOBS, _stub(task, job_id, args, kwargs, options, now)):
        earlier = session.execute(select(Job.name).where(Job.id == job_id)).scalar_one_or_none()
        if key is not None:
            if earlier != task.name:
                raise IdempotencyConflict(
                    f"idempotency key {key!r} was used for a {earlier} job",
                    code="idempotency_conflict",
                )
            return Submitted(job_id, created=False)
    row = {"id": job_id, "name": task.name, "message": message, "created_at": now,
           "published_at": None, "attempts": 0, "last_error": None,
           "delivered_by": None}  # fmt: skip
    if not _insert(session, dialect, _OUTBOX, row):
        return Submitted(job_id, created=False)  # this id is in the outbox already
    if dialect == "postgresql":
        _notify_once(session)
    return Submitted(job_id, created=True, result=task.AsyncResult(job_id))


def _notify_once(session: Session) -> None:
    """Wake the relays when ``session``'s transaction commits (PostgreSQL delivers a NOTIFY
    only then): once per transaction, however many jobs it adds."""
    transaction = session.get_transaction()
    marker = session.info.get(_NOTIFIED)
    if transaction is not None and marker is not None and marker() is transaction:
        return
    session.execute(select(func.pg_notify(CHANNEL, "")))
    if transaction is not None:
        session.info[_NOTIFIED] = weakref.ref(transaction)


def check_session(session: Session, database_url: str) -> str:
    """The dialect of ``session``'s database; ConfigurationError unless it is the history
    database at ``database_url`` (the relay reads only that one: a job written elsewhere would
    wait forever). Compares backend, host, port, database and query (a schema given as
    ``options=-csearch_path=...``); not the driver, user or password."""
    bind = session.get_bind()
    url = bind.engine.url
    if _same_database(url, make_url(database_url)):
        return bind.dialect.name
    raise ConfigurationError(
        f"the outbox lives in the history database ({_shown(make_url(database_url))}), but the "
        f"session is on {_shown(url)}: give apply_in/submit a session on the history "
        "database (TASKS_DATABASE_URL)"
    )


def _same_database(a: URL, b: URL) -> bool:
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return _sqlite_path(a.database) == _sqlite_path(b.database)
    return (a.host or "localhost", a.port, a.database, dict(a.query)) == (
        b.host or "localhost",
        b.port,
        b.database,
        dict(b.query),
    )


def _sqlite_path(database: str | None) -> str:
    if not database or database == ":memory:":
        return ":memory:"
    return str(Path(database).resolve())


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def pending(
    session: Session, *, older_than: timedelta | None = None, limit: int | None = None
) -> list[OutboxMessage]:
    """Jobs committed to the outbox and not yet published, oldest first.

    ``older_than`` keeps those accepted at least that long ago (a relay normally publishes
    within milliseconds: an old pending row means no relay runs or the broker is down).
    """
    query = select(OutboxMessage).where(OutboxMessage.published_at.is_(None))
    if older_than is not None:
        query = query.where(OutboxMessage.created_at <= datetime.now(UTC) - older_than)
    query = query.order_by(OutboxMessage.created_at, OutboxMessage.id)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def is_pending(session: Session, job_id: str) -> bool:
    """True while job ``job_id`` waits in the outbox (committed, not yet published)."""
    query = select(OutboxMessage.id).where(
        OutboxMessage.id == job_id, OutboxMessage.published_at.is_(None)
    )
    return session.execute(query).first() is not None


def claim(session: Session, limit: int) -> list[OutboxMessage]:
    """Lock up to ``limit`` pending rows, oldest first, skipping rows another relay holds."""
    dialect = session.get_bind().dialect.name
    query = (
        select(OutboxMessage)
        .where(OutboxMessage.published_at.is_(None))
        .order_by(OutboxMessage.created_at, OutboxMessage.id)
        .limit(limit)
    )
    if dialect == "postgresql":
        query = query.with_for_update(skip_locked=True)
    else:  # SQLite has no row locks: take the database's write lock before reading
        session.execute(update(_OUTBOX).where(false()).values(attempts=0))
    return list(session.scalars(query))


def mark_published(session: Session, ids: Sequence[str], at: datetime) -> None:
    """Mark ``ids`` published at ``at`` (in the transaction that claimed them)."""
    if ids:
        statement = update(_OUTBOX).where(_OUTBOX.c.id.in_(list(ids)))
        session.execute(statement.values(published_at=at, attempts=_OUTBOX.c.attempts + 1))


def note_failure(session: Session, ids: Sequence[str], error: str) -> None:
    """Count one failed publish of ``ids`` and keep its reason (they stay pending)."""
    if ids:
        statement = update(_OUTBOX).where(_OUTBOX.c.id.in_(list(ids)))
        values = {"attempts": _OUTBOX.c.attempts + 1, "last_error": error[:2000]}
        session.execute(statement.values(values))


def claim_delivery(
    session: Session, job_id: str, publish_id: str, *, table: Table = _OUTBOX
) -> bool | None:
    """Let the delivery of publish ``publish_id`` run job ``job_id``, unless another publish of
    the job already did: True = run it, False = a duplicate, None = no row (run it).

    ``table`` keeps the first delivery taken in its ``delivered_by`` column: the outbox (by
    default), or the history's ``jobs`` (a job submitted with an idempotency key)."""
    statement = (
        update(table)
        .where(table.c.id == job_id)
        .where((table.c.delivered_by.is_(None)) | (table.c.delivered_by == publish_id))
        .values(delivered_by=publish_id)
    )
    if session.execute(statement).rowcount:  # type: ignore[attr-defined]
        return True
    exists = session.execute(select(table.c.id).where(table.c.id == job_id)).first()
    return False if exists is not None else None


def prune(session: Session, *, older_than: timedelta) -> int:
    """Delete rows published more than ``older_than`` ago; how many."""
    cutoff = datetime.now(UTC) - older_than
    result = session.execute(delete(_OUTBOX).where(_OUTBOX.c.published_at < cutoff))
    return int(result.rowcount)  # type: ignore[attr-defined]


def signature_of(row: OutboxMessage) -> dict[str, Any]:
    """The Celery signature (a dict) an outbox row holds."""
    return dict(row.message)


# -- helpers -------------------------------------------------------------------------------------
#: apply_async options that cannot be kept in a row (objects, callbacks, a live connection)
_UNSTORABLE = ("producer", "connection", "publisher", "router", "link", "link_error", "chain",
               "chord", "group_id", "idempotency_key")  # fmt: skip


def _refuse_unstorable(options: dict[str, Any]) -> None:
    given = sorted(name for name in _UNSTORABLE if options.get(name) is not None)
    if given:
        raise InvalidPayload(
            f"option(s) {', '.join(given)} cannot go through the outbox "
            "(pass the idempotency key as key=; callbacks and workflows are published directly)"
        )


def _message(
    task: PlatformTask,
    job_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    options = dict(options)
    countdown = options.pop("countdown", None)
    eta = options.pop("eta", None)
    if countdown is not None:  # relative to acceptance, not to the (maybe late) publish
        eta = now + timedelta(seconds=float(countdown))
    if isinstance(eta, datetime):
        eta = eta.isoformat()
    if eta is not None:
        options["eta"] = str(eta)
    expires = options.get("expires")
    if isinstance(expires, datetime):
        options["expires"] = expires.isoformat()
    queue = options.get("queue")
    if queue is not None and not isinstance(queue, str):
        options["queue"] = queue.name  # a kombu Queue: kept by name
    message = {"task": task.name, "id": job_id, "args": list(args), "kwargs": kwargs,
               "options": options}  # fmt: skip
    try:
        json.dumps(message)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"a job in the outbox must be JSON: {exc}") from exc
    return message


def _stub(
    task: PlatformTask,
    job_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    headers = dict(options.get("headers") or {})
    headers.setdefault(PRIORITY_HEADER, task.platform_priority.value)
    row: dict[str, Any] = dict.fromkeys(c.name for c in _JOBS.columns)
    row.update(job_facts(task.app, task.name, args, kwargs, headers))
    row.update(id=job_id, state=JobState.PENDING.value, progress=-1, attempts=0,
               queue=task.family, queued_at=now, updated_at=now)  # fmt: skip
    return row


def _insert(session: Session, dialect: str, table: Table, row: dict[str, Any]) -> bool:
    """Insert ``row`` unless its id is taken (on PostgreSQL, waiting for a concurrent insert of
    the same id to commit or roll back); True if it was inserted."""
    if dialect == "postgresql":
        statement: Any = postgresql.insert(table)
    elif dialect == "sqlite":
        statement = sqlite.insert(table)
    else:
        raise ConfigurationError(f"the outbox needs PostgreSQL or SQLite, not {dialect}")
    statement = statement.values(row).on_conflict_do_nothing(index_elements=["id"])
    return bool(session.execute(statement.returning(table.c.id)).first())
