"""Intake pacing: a rate-limited tenant's jobs enter the work queue at its rate, not at once.

Called by ``PlatformTask.apply_async`` (only when tenant limits are configured). A job whose
tenant has a rate limit for its type reserves the tenant's next start slot; due now, it is
published at once (marked paced); due later, it is stored as its Celery signature (chain,
callbacks, headers, priority and id kept) in the deferred set, recorded ``queued`` with
``deferred_until`` in the history, and published by a worker's mover when its slot comes.
A job already paced, a retry, or one with a countdown or ETA is left to the worker's check.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from celery.utils import uuid

from tasks_platform.history.models import JobState
from tasks_platform.history.recorder import job_facts, record
from tasks_platform.history.writer import Transition
from tasks_platform.jobs.declaration import REPLAYS_HEADER, TENANT_HEADER
from tasks_platform.limits.store import PACED_HEADER, entry, limits_for, moment

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery
    from tasks_platform.jobs.declaration import PlatformTask

#: options that are not part of the job and cannot be stored
_TRANSIENT_OPTIONS = ("producer", "connection", "publisher", "router", "add_to_parent")


def pace(
    task: PlatformTask,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    *,
    task_id: str | None,
    link: Any = None,
    link_error: Any = None,
    shadow: str | None = None,
) -> tuple[str | None, Any]:
    """``(task_id, None)`` to publish now (``options`` then carry the paced header), or
    ``(task_id, AsyncResult)`` for a job deferred to its slot. Raises LimitsUnavailable."""
    headers = options.get("headers") or {}
    if (
        PACED_HEADER in headers
        or options.get("countdown")
        or options.get("eta")
        or int(options.get("retries") or headers.get("retries") or 0) > 0
    ):
        return task_id, None
    settings = task.app.settings
    tenant = headers.get(TENANT_HEADER)
    limit = settings.tenant_limit(tenant, task.name)
    if limit is None or limit.rate is None:
        return task_id, None
    task_id = task_id or uuid()
    options["headers"] = headers = {**headers, PACED_HEADER: "1"}
    stored = {k: v for k, v in options.items() if k not in _TRANSIENT_OPTIONS}
    signature = task.signature(args, kwargs, task_id=task_id, link=link, link_error=link_error,
                               shadow=shadow, **stored)  # fmt: skip
    slot = limits_for(settings).pace(tenant, task.name, limit, entry(dict(signature)))
    if slot is None:
        return task_id, None
    queue = options.get("queue") or options.get("routing_key")
    record_deferral(task.app, task_id, task.name, args, kwargs, options.get("headers") or {},
                    queue=getattr(queue, "name", queue),  # a name or a kombu Queue
                    state=JobState.QUEUED, attempt=1, until=slot, reason="rate")  # fmt: skip
    return task_id, task.AsyncResult(task_id)


def record_deferral(
    app: PlatformCelery,
    job_id: str,
    name: str,
    args: Any,
    kwargs: Any,
    headers: dict[str, Any],
    *,
    queue: object,
    state: JobState,
    attempt: int,
    until: float,
    reason: str,
    worker: str | None = None,
) -> None:
    """Tell the history that a job waits until ``until`` for its tenant's ``reason`` limit
    (an event of the job; its state stays ``state``)."""
    facts = job_facts(app, name, args, kwargs, headers)
    facts["queue"] = app.topology.family_of(queue) if isinstance(queue, str) else None
    detail = {"deferred_until": moment(until), "reason": reason}
    record(app, Transition(job_id, state, attempt, time.time(),
                           replays=int(headers.get(REPLAYS_HEADER) or 0), worker=worker,
                           facts=facts, detail=detail))  # fmt: skip
