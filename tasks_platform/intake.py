"""Intake: a job's history row written before its message is published; idempotency keys.

Submitting with an idempotency key (``task.apply_async(..., idempotency_key="order-1234")``,
``submit(name, payload, idempotency_key=...)``, the admin API) queues the job at most once per
key and tenant: a repeat returns the first job's id and queues nothing.

How: the key gives the job a deterministic id, a UUID derived from the tenant and the key, and
the job's history row is inserted *before* its message is published. The row's primary key is
then what makes the key unique: of two concurrent submissions with one key (threads or
processes), the database lets one insert the row and the other finds it (on PostgreSQL it
waits for the first transaction), and only the first publishes. Keys are scoped per tenant:
two tenants using the same key get two jobs, and neither learns about the other's. A key that
comes back with another job type raises :class:`~tasks_platform.errors.IdempotencyConflict`.
If publishing fails for sure, the row is removed again and the error raised, so the key may
be used again. If the publish may have reached the broker
(:class:`~tasks_platform.errors.PublishNotConfirmed`), the row stays, marked
``publish_uncertain``: the next submission with the key publishes the job again, and
:func:`tasks_platform.outbox.delivery.is_duplicate` lets a worker run only one of the
copies. The key travels in the ``idempotency_key`` header (a payment job passes it on to its
provider) and is kept in the job's row: a key is remembered as long as that row, i.e. until
the history cleanup removes the finished job (``history_retention_days``). Without a history
(``history_enabled=False``) there is nowhere to keep a key, and using one is an error.

The row is a stub like the ones the recorder writes (``progress`` -1): the recorder's own
transitions then fill it in as usual. The API writes one for every job it accepts, key or not,
so that the job can be read (and its tenant checked) the moment its id is returned.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.errors import (
    ConfigurationError,
    HistoryUnavailable,
    IdempotencyConflict,
    InvalidPayload,
    PublishNotConfirmed,
    UnknownJob,
)
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import Job, JobState
from tasks_platform.history.recorder import job_facts, prepare_embedded_database
from tasks_platform.jobs.declaration import (
    IDEMPOTENCY_KEY_HEADER,
    PRIORITY_HEADER,
    PUBLISH_ID_HEADER,
    TENANT_HEADER,
    PlatformTask,
    check_tenant,
)
from tasks_platform.topology import Priority

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

log = logging.getLogger(__name__)

#: namespace of the ids derived from idempotency keys (fixed: ids must not change)
IDEMPOTENCY_NAMESPACE = uuid.UUID("4d6f0a52-2f5c-4b8e-9a49-7c1d2b8e6f31")
#: an idempotency key: 1-255 characters, no control characters
KEY_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")
#: attempts at claiming a key whose earlier submission keeps failing to publish
_CLAIM_ATTEMPTS = 3


@dataclass(frozen=True)
class Submitted:
    """What a submission gave: the job's id, and whether it was queued now."""

    id: str
    #: False when the idempotency key named an earlier job (nothing was queued)
    created: bool
    #: the AsyncResult of the job queued now (None for an earlier job)
    result: Any = None


def idempotent_id(tenant: str | None, key: str) -> str:
    """The job id an idempotency key stands for, within a tenant (or none)."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{tenant or ''}\n{key}"))


def declared_task(app: PlatformCelery, name: str) -> PlatformTask:
    """The job type declared as ``name``; UnknownJob (naming the declared ones) if none is."""
    task = app.tasks.get(name)
    if not isinstance(task, PlatformTask):
        known = sorted(n for n, t in app.tasks.items() if isinstance(t, PlatformTask))
        raise UnknownJob(f"no job type named {name!r}; declared: {', '.join(known)}")
    return task


class Intake:
    """Records jobs in the history behind ``sessions`` before publishing them."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def submit(
        self,
        task: PlatformTask,
        *,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        key: str | None = None,
        tenant: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Submitted:
        """Validate, record and queue a job (once per ``key`` and ``tenant``, if a key is given).

        ``options`` are :meth:`PlatformTask.apply_async` options. InvalidPayload refuses a bad
        payload, tenant or key; IdempotencyConflict a key used for another job type;
        HistoryUnavailable says the database could not be reached (nothing was queued).
        """
        args, kwargs = task.validate_payload(args, kwargs or {})
        options = dict(options or {})
        check_tenant(tenant)
        headers = dict(options.pop("headers", None) or {})
        job_id = options.pop("task_id", None)
        if key is not None:
            check_key(key)
            derived = idempotent_id(tenant, key)
            if job_id is not None and job_id != derived:
                raise InvalidPayload("give a job an idempotency key or a task id, not both")
            job_id, headers[IDEMPOTENCY_KEY_HEADER] = derived, key
            headers[PUBLISH_ID_HEADER] = uuid.uuid4().hex  # this publish (see outbox.delivery)
        job_id = str(job_id or uuid.uuid4())
        stub_headers = {**headers, TENANT_HEADER: tenant, PRIORITY_HEADER: _priority(task, options)}
        try:
            earlier = self._claim(lambda: _stub(task, job_id, args, kwargs, stub_headers))
            # a keyed job whose publish may have failed: this submission publishes it again
            again = (earlier is not None and earlier.name == task.name
                     and earlier.publish_uncertain and self._retake(job_id))  # fmt: skip
        except (OperationalError, InterfaceError) as exc:  # unreachable, not a bad statement
            raise HistoryUnavailable(
                f"could not submit a {task.name} job: the history database is unavailable "
                f"({type(exc.orig or exc).__name__}); nothing was queued: submit it again"
                + (" with the same idempotency key" if key is not None else "")
            ) from exc
        if earlier is not None and not again:
            if earlier.name != task.name:
                raise IdempotencyConflict(
                    f"idempotency key {key!r} was used for a {earlier.name} job",
                    code="idempotency_conflict",
                )
            return Submitted(earlier.id, created=False)
        if tenant is not None:
            options["tenant"] = tenant
        try:
            result = task.apply_async(args, kwargs, task_id=job_id, headers=headers, **options)
        except BaseException as exc:
            # a keyed job that may be queued keeps its row, marked, so that the key publishes
            # it again and a worker runs only one copy; one that is surely not queued frees it
            if key is not None and (again or isinstance(exc, PublishNotConfirmed)):
                self._mark_uncertain(job_id)
            else:
                self._release(job_id)
            raise
        return Submitted(job_id, created=True, result=result)

    def _claim(self, stub: Callable[[], Job]) -> Job | None:
        """Insert the stub row; None if that worked, else the job that already has its id."""
        for _ in range(_CLAIM_ATTEMPTS):
            with self.sessions() as session:
                row = stub()
                session.add(row)
                try:
                    session.commit()
                    return None
                except IntegrityError:
                    session.rollback()
                earlier = session.get(Job, row.id)
                if earlier is not None:
                    return earlier
            # the other submission failed to publish and removed its row: try again
        raise IdempotencyConflict(
            "another submission with this idempotency key keeps failing; try again later",
            code="idempotency_in_flight",
        )

    def _retake(self, job_id: str) -> bool:
        """Take the republishing of a keyed job whose publish may have failed: True for one
        submission only, and only while no worker ran a copy of it (nor recorded it)."""
        claimed = (
            update(Job)
            .where(Job.id == job_id, Job.publish_uncertain.is_(True))
            .where(Job.progress < 0, Job.delivered_by.is_(None))
            .values(publish_uncertain=False)
        )
        with self.sessions.begin() as session:
            return bool(session.execute(claimed).rowcount)  # type: ignore[attr-defined]

    def _mark_uncertain(self, job_id: str) -> None:
        """Keep the row of a keyed job that may be queued, for the key to publish it again."""
        try:
            with self.sessions.begin() as session:
                session.execute(update(Job).where(Job.id == job_id).values(publish_uncertain=True))
        except Exception:
            log.exception("could not mark job %s as maybe not queued: a submission with its "
                          "key will take it as queued", job_id)  # fmt: skip

    def _release(self, job_id: str) -> None:
        """Remove the stub of a job that was not published (only while nothing recorded it)."""
        try:
            with self.sessions.begin() as session:
                session.execute(delete(Job).where(Job.id == job_id, Job.progress < 0))
        except Exception:
            log.exception("could not remove the history row of unpublished job %s", job_id)


def _stub(
    task: PlatformTask,
    job_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    headers: dict[str, Any],
) -> Job:
    facts = job_facts(task.app, task.name, args, kwargs, headers)
    now = datetime.now(UTC)
    return Job(
        id=job_id,
        state=JobState.QUEUED.value,
        progress=-1,  # like the recorder's stubs: its first transition moves it on
        attempts=0,
        queue=task.family,
        queued_at=now,
        updated_at=now,
        **facts,
    )


def _priority(task: PlatformTask, options: dict[str, Any]) -> str | None:
    value = options.get("priority")
    if value is None:
        return task.platform_priority.value
    if isinstance(value, str | Priority):
        try:
            return Priority.parse(value).value
        except ValueError as exc:
            raise InvalidPayload(str(exc)) from None
    return None  # a broker number: the recorder fills the name in from the message


def check_key(key: object) -> None:
    """InvalidPayload unless ``key`` is a valid idempotency key."""
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise InvalidPayload(
            f"an idempotency key is 1-255 characters without control characters, got {key!r}"
        )


# -- one intake per process and history database ------------------------------------------------
_intakes: dict[str, tuple[Intake, Engine]] = {}
_lock = threading.Lock()


def intake_for(app: PlatformCelery) -> Intake:
    """The intake writing to ``app``'s history (connected on first use, shared by threads)."""
    settings = app.settings
    if not settings.history_enabled:
        raise ConfigurationError(
            "idempotency keys are kept in the job history, which is disabled "
            "(TASKS_HISTORY_ENABLED=false): enable it, or submit without a key"
        )
    where = f"{settings.data_dir.resolve()}|{settings.effective_database_url}"
    with _lock:
        known = _intakes.get(where)
        if known is None:
            if settings.effective_database_url.startswith("sqlite"):
                prepare_embedded_database(settings)
            engine = create_history_engine(settings)
            known = _intakes[where] = (Intake(session_factory(engine)), engine)
        return known[0]


def apply_once(
    task: PlatformTask,
    key: str,
    args: tuple[Any, ...] | list[Any] | None,
    kwargs: dict[str, Any] | None,
    options: dict[str, Any],
) -> Any:
    """``task.apply_async(..., idempotency_key=key)``: the new job's or the first job's result."""
    options = dict(options)
    tenant = options.pop("tenant", None)
    if tenant is None:
        tenant = (options.get("headers") or {}).get(TENANT_HEADER)
    submitted = intake_for(task.app).submit(
        task, args=args or (), kwargs=kwargs, key=key, tenant=tenant, options=options
    )
    return submitted.result or task.AsyncResult(submitted.id)


def close_all() -> None:
    """Close the connections of every intake of this process."""
    with _lock:
        engines = [engine for _, engine in _intakes.values()]
        _intakes.clear()
    for engine in engines:
        engine.dispose()


def _forget_after_fork() -> None:
    # a child must not use (nor close) the connections it inherited: they are the parent's
    for _, engine in _intakes.values():
        engine.dispose(close=False)
    _intakes.clear()
    _lock.release()


# the lock is held across fork(), so that no child inherits it taken
os.register_at_fork(
    before=_lock.acquire, after_in_parent=_lock.release, after_in_child=_forget_after_fork
)
atexit.register(close_all)
