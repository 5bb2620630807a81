"""``submit()``: queue a job by its declared name."""

from __future__ import annotations

from typing import Any, cast

from celery import current_app

from tasks_platform.application import PlatformCelery
from tasks_platform.intake import declared_task
from tasks_platform.topology import Priority


def platform_app(app: Any = None) -> PlatformCelery:
    """``app``, else the current app if it is a platform app, else ``tasks_platform.app``.

    Celery's current app is per thread: in a thread of its own, it is a bare default app.
    """
    if app is not None:
        return cast(PlatformCelery, app)
    current = current_app._get_current_object()
    if isinstance(current, PlatformCelery):
        return current
    import tasks_platform  # noqa: PLC0415 - the package imports this module

    return tasks_platform.app


def submit(
    name: str,
    payload: dict[str, Any] | None = None,
    *,
    priority: Priority | str | None = None,
    countdown: float | None = None,
    task_id: str | None = None,
    tenant: str | None = None,
    idempotency_key: str | None = None,
    app: Any = None,
    session: Any = None,
) -> str:
    """Queue job ``name`` with ``payload``; returns the job id.

    The payload is validated against the job type's schema first: an invalid payload raises
    :class:`~tasks_platform.errors.InvalidPayload` and nothing is queued. ``tenant`` names
    whose job it is (history, tenant limits, usage). With an ``idempotency_key``, a job is
    queued once per key and tenant: a repeat returns the first job's id and queues nothing
    (see :mod:`tasks_platform.intake`). With a SQLAlchemy ``session`` (on the history
    database), the job goes to the outbox in that session's transaction and runs only if the
    caller commits it (see :mod:`tasks_platform.outbox`); nothing is committed here.
    """
    task = declared_task(platform_app(app), name)
    options: dict[str, Any] = {}
    if priority is not None:
        options["priority"] = str(priority)
    if countdown is not None:
        options["countdown"] = countdown
    if task_id is not None:
        options["task_id"] = task_id
    if tenant is not None:
        options["tenant"] = tenant
    if session is not None:
        result = task.apply_in(session, kwargs=dict(payload or {}),
                               idempotency_key=idempotency_key, **options)  # fmt: skip
        return cast(str, result.id)
    if idempotency_key is not None:
        options["idempotency_key"] = idempotency_key
    result = task.apply_async(kwargs=dict(payload or {}), **options)
    return cast(str, result.id)
