"""Cancellations, durably: the store every worker reads, and the check a running job makes.

An operator's cancel (:class:`tasks_platform.control.Control`) writes a
:class:`~tasks_platform.history.models.JobCancellation` row in the history database, then tells
the live workers. Celery keeps revoked ids in the memory of each worker only, so the row is what
makes a cancellation last: every worker loads the *outstanding* ones (jobs not yet ended,
cancelled within ``cancel_retention``) into Celery's revoked set when it starts and again every
``control_recheck_interval`` (:mod:`tasks_platform.worker_control`).

A running job stops by itself where it cannot be terminated (thread pools, or when it should
clean up first): :meth:`JobContext.cancelled() <tasks_platform.jobs.JobContext.cancelled>` asks
:func:`cancellation_requested`, which looks at the revoked set of its own process (a thread or
solo pool shares it with the consumer) and then at the store, at most once a second per job.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from datetime import datetime
from typing import Any

from celery.worker import state as worker_state
from sqlalchemy import Engine, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import TERMINAL_STATES, Job, JobCancellation, JobState
from tasks_platform.settings import Settings

logger = logging.getLogger(__name__)

#: most cancellations a worker loads at once (Celery's revoked set holds 50 000 ids)
OUTSTANDING_LIMIT = 20_000
#: seconds between two looks at the store for the same running job
CHECK_INTERVAL = 1.0
#: seconds a worker waits for the history database before it gives up (and goes on)
CONNECT_TIMEOUT = 5
_REMEMBERED_MAX = 10_000
#: a cancel of a job that ended as ``failed`` came too late as well
_OVER = frozenset({*TERMINAL_STATES, JobState.FAILED})


def outstanding(session: Session, *, since: datetime, limit: int = OUTSTANDING_LIMIT) -> list[str]:
    """Ids of jobs cancelled at or after ``since`` that have not ended yet, newest first.

    A cancelled job that is not (or no longer) in the history counts as outstanding.
    """
    query = (
        select(JobCancellation.job_id)
        .outerjoin(Job, Job.id == JobCancellation.job_id)
        .where(JobCancellation.requested_at >= since)
        .where(or_(Job.id.is_(None), Job.state.not_in([str(state) for state in _OVER])))
        .order_by(JobCancellation.requested_at.desc())
        .limit(limit)
    )
    return list(session.scalars(query).all())


def store_engine(settings: Settings, *, connections: int) -> Engine:
    """An engine on the history database that gives up quickly: control never hangs a worker."""
    options: dict[str, Any] = {
        "pool_size": 1,
        "max_overflow": max(connections - 1, 0),
        "pool_timeout": CONNECT_TIMEOUT,
    }
    if settings.effective_database_url.startswith("postgresql"):
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    return create_history_engine(settings, **options)


class CancellationCheck:
    """Answers "was this job cancelled?" for the jobs running in one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._looked: dict[str, float] = {}  # job id -> monotonic time of the last look
        self._cancelled: set[str] = set()
        self._failures = 0

    def __call__(self, job_id: str) -> bool:
        if job_id in worker_state.revoked or job_id in self._cancelled:
            return True
        now = time.monotonic()
        with self._lock:
            if len(self._looked) >= _REMEMBERED_MAX:
                self._looked.clear()
            # the first look waits CHECK_INTERVAL (short jobs never look), then once per interval
            last = self._looked.setdefault(job_id, now)
            if now - last < CHECK_INTERVAL:
                return False
            self._looked[job_id] = now
        found = self._look(job_id)
        if found:
            self._cancelled.add(job_id)
        return found

    def _look(self, job_id: str) -> bool:
        try:
            with Session(self._connect()) as session:
                return session.get(JobCancellation, job_id) is not None
        except SQLAlchemyError as exc:
            self._failures += 1
            if self._failures == 1 or self._failures % 100 == 0:
                logger.warning("cannot read cancellations (%s); job %s goes on",
                               exc.__class__.__name__, job_id)  # fmt: skip
            return False

    def _connect(self) -> Engine:
        if self._engine is None:
            self._engine = store_engine(self.settings, connections=4)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


# -- one check per process and database ----------------------------------------------------------
_checks: dict[str, CancellationCheck] = {}
_registry_lock = threading.Lock()


def cancellation_requested(settings: Settings, job_id: str) -> bool:
    """True once an operator cancelled ``job_id`` (see the module docstring)."""
    key = settings.effective_database_url
    with _registry_lock:
        check = _checks.get(key)
        if check is None:
            check = _checks[key] = CancellationCheck(settings)
    return check(job_id)


def close_all() -> None:
    with _registry_lock:
        checks = list(_checks.values())
        _checks.clear()
    for check in checks:
        check.close()


def _forget_after_fork() -> None:
    _checks.clear()  # a pool process opens connections of its own


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(close_all)
