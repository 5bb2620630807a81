"""``submit()``: queue a job by its declared name."""

from __future__ import annotations

from typing import Any, cast

from celery import current_app

from tasks_platform.errors import UnknownJob
from tasks_platform.jobs.declaration import PlatformTask
from tasks_platform.topology import Priority


def submit(
    name: str,
    payload: dict[str, Any] | None = None,
    *,
    priority: Priority | str | None = None,
    countdown: float | None = None,
    task_id: str | None = None,
    app: Any = None,
) -> str:
    """Queue job ``name`` with ``payload``; returns the job id.

    The payload is validated against the job type's schema first: an invalid payload raises
    :class:`~tasks_platform.errors.InvalidPayload` and nothing is queued.
    """
    app = app or current_app
    task = app.tasks.get(name)
    if not isinstance(task, PlatformTask):
        known = sorted(n for n, t in app.tasks.items() if isinstance(t, PlatformTask))
        raise UnknownJob(f"no job type named {name!r}; declared: {', '.join(known)}")
    options: dict[str, Any] = {}
    if priority is not None:
        options["priority"] = str(priority)
    if countdown is not None:
        options["countdown"] = countdown
    if task_id is not None:
        options["task_id"] = task_id
    result = task.apply_async(kwargs=dict(payload or {}), **options)
    return cast(str, result.id)
