"""Admission: the worker's check of its tenant's limits, before a job goes to the pool.

Runs in the worker's main process (``PlatformRequest.execute_using_pool``), so a job over a
limit never starts: no ``started`` is recorded and no attempt is counted. Over a limit, the
job is *deferred*: its signature (as Celery builds a retry's: same id, retries, headers,
callbacks) is stored in the deferred set first, and only then is its message acknowledged;
the history gets an event saying until when and why, and the job's state stays as it was.

* over the concurrency limit: it comes back after ``limits_defer_delay`` seconds plus up to
  half of that again (jitter, so that jobs deferred together do not return together);
* over the rate: it comes back at the execution slot it was given, which it then holds
  (``SLOT_HEADER``): it does not spend a second slot, so a backlog drains in one pass;
* Redis does not answer: the message is put back in its queue after ``limits_defer_delay``
  seconds (logged as an error each time); the job neither runs unlimited nor is lost.

The concurrency lease is given back when the job ends, however it ends; a worker that dies
leaves it to expire (the job's hard time limit plus ``LEASE_MARGIN``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.exceptions import TaskRevokedError
from celery.worker.request import Request
from celery.worker.state import task_ready

from tasks_platform.errors import LimitsUnavailable
from tasks_platform.history.models import JobState
from tasks_platform.jobs.declaration import TENANT_HEADER
from tasks_platform.limits.pacing import record_deferral
from tasks_platform.limits.store import (
    LEASE_MARGIN,
    PACED_HEADER,
    SLOT_HEADER,
    Decision,
    entry,
    held_slot,
    limits_for,
    moment,
    retry_delay,
    slot_header,
)

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """A running job's place under its tenant's concurrency limit."""

    tenant: str | None
    job: str
    job_id: str


class LimitedRequest(Request):  # type: ignore[misc]
    """A Celery request that keeps to its tenant's limits (see the module docstring).

    Celery's worker derives a request class per job type (``create_request_cls``) whose own
    fast ``execute_using_pool`` and ``on_success`` do not call these: ``__init_subclass__``
    wraps them the same way.
    """

    _lease: Lease | None = None  # its place under its tenant's concurrency limit

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, wrap in (("execute_using_pool", _admitting), ("on_success", _releasing)):
            own = cls.__dict__.get(name)
            if own is not None and not getattr(own, "keeps_limits", False):
                setattr(cls, name, wrap(own))

    def execute_using_pool(self, pool: Any, **kwargs: Any) -> Any:
        self.admit_or_defer()
        return super().execute_using_pool(pool, **kwargs)

    def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        try:
            return super().on_success(failed__retval__runtime, **kwargs)
        finally:
            self.end_lease()

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        try:  # however it ended: failed, retried, lost, terminated, cancelled
            return super().on_failure(exc_info, send_failed_event, return_ok)
        finally:
            self.end_lease()

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        try:
            return super().on_timeout(soft, timeout)
        finally:
            if not soft:
                self.end_lease()

    def admit_or_defer(self) -> None:
        """Return if the job may go to the pool; else raise TaskRevokedError, which is how
        Celery's worker learns that a request did not go to the pool (its slot is freed)."""
        if self.app.settings.tenant_limits and not self.revoked():
            admitted, self._lease = admit(self)
            if not admitted:
                raise TaskRevokedError(self.id)

    def end_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            release(self.app, lease)


def _admitting(execute: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(execute)
    def execute_using_pool(self: LimitedRequest, pool: Any, **kwargs: Any) -> Any:
        self.admit_or_defer()
        return execute(self, pool, **kwargs)

    execute_using_pool.keeps_limits = True  # type: ignore[attr-defined]
    return execute_using_pool


def _releasing(on_success: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(on_success)
    def wrapped(self: LimitedRequest, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        try:
            return on_success(self, failed__retval__runtime, **kwargs)
        finally:
            self.end_lease()

    wrapped.keeps_limits = True  # type: ignore[attr-defined]
    return wrapped


#: the worker's timer, per app, to put messages back later (set by the mover step)
_timers: dict[int, Any] = {}
_timers_lock = threading.Lock()


def install(app: PlatformCelery, timer: Any) -> None:
    with _timers_lock:
        _timers[id(app)] = timer


def admit(request: Any) -> tuple[bool, Lease | None]:
    """``(True, lease or None)``: run ``request`` now; ``(False, None)``: it was deferred or
    will be put back (it must not go to the pool)."""
    app: PlatformCelery = request.app
    settings = app.settings
    headers = request.request_dict
    tenant, job = headers.get(TENANT_HEADER), request.task.name
    limit = settings.tenant_limit(tenant, job)
    if limit is None:
        return True, None
    limits = limits_for(settings)
    retries = int(headers.get("retries") or 0)
    try:
        decision = limits.admit(tenant, job, limit, job_id=request.id,
                                lease_seconds=lease_seconds(request),
                                held=held_slot(headers.get(SLOT_HEADER), retries))  # fmt: skip
        if decision.admitted:
            return True, (Lease(tenant, job, request.id) if limit.concurrency else None)
        if decision.reason == "rate":
            until = decision.until
        else:
            until = decision.now + retry_delay(settings.limits_defer_delay)
        limits.defer(_member(request, decision, until, retries), until)
    except LimitsUnavailable as exc:
        _put_back_later(request, exc)
        return False, None
    # stored: the message may go (never before: a worker dying here leaves the message)
    task_ready(request)
    request.acknowledge()
    _record(request, decision, until, retries)
    logger.info("job %s[%s] of tenant %s deferred until %s (%s limit)",
                job, request.id, tenant, moment(until), decision.reason)  # fmt: skip
    return False, None


def release(app: PlatformCelery, lease: Lease) -> None:
    """Give the lease back (if Redis does not answer, it expires by itself)."""
    try:
        limits_for(app.settings).release(lease.tenant, lease.job, lease.job_id)
    except LimitsUnavailable as exc:
        logger.warning("%s; the lease of job %s expires by itself", exc, lease.job_id)


def lease_seconds(request: Any) -> float:
    """How long a lease lasts: the job's hard time limit plus a margin."""
    hard = (getattr(request, "time_limits", None) or (None, None))[0]
    hard = hard or getattr(request.task, "time_limit", None) or request.app.settings.time_limit
    return float(hard) + LEASE_MARGIN


def _member(request: Any, decision: Decision, until: float, retries: int) -> str:
    """The job as a Celery signature, as JSON, marked so that it is not paced again."""
    signature = request.task.signature_from_request(request._context)
    options = signature.options
    options.pop("redelivered", None)
    headers = dict(options.get("headers") or {})
    headers[PACED_HEADER] = "1"
    if decision.reason == "rate":
        headers[SLOT_HEADER] = slot_header(retries, until)
    else:
        headers.pop(SLOT_HEADER, None)
    options["headers"] = headers
    return entry(dict(signature))


def _record(request: Any, decision: Decision, until: float, retries: int) -> None:
    # the state stays: queued for a first attempt, retrying for a retry
    state, attempt = (JobState.QUEUED, 1) if retries == 0 else (JobState.RETRYING, retries)
    record_deferral(request.app, request.id, request.task.name, request.args, request.kwargs,
                    request.request_dict,
                    queue=(request.delivery_info or {}).get("routing_key") or None, state=state,
                    attempt=attempt, until=until, reason=str(decision.reason),
                    worker=request.hostname)  # fmt: skip


def _put_back_later(request: Any, exc: LimitsUnavailable) -> None:
    delay = request.app.settings.limits_defer_delay
    logger.error("%s: job %s[%s] not started; it goes back to its queue in %.1f s",
                 exc, request.task.name, request.id, delay)  # fmt: skip

    def put_back() -> None:
        task_ready(request)
        request.reject(requeue=True)

    timer = _timers.get(id(request.app))
    if timer is None:
        put_back()
    else:
        timer.call_after(delay, put_back)
