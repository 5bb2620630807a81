"""Submitting through the outbox without a session of the caller: a transaction of its own.

Job types declared ``outbox=True`` (``payments.charge``) take this path on ``apply_async`` and
``delay``: the job is committed to the outbox before the call returns, so it survives a broker
outage; the relay publishes it. Callers that have a transaction use ``task.apply_in(session)``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.errors import ConfigurationError
from tasks_platform.outbox.store import enqueue

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery
    from tasks_platform.jobs.declaration import PlatformTask

log = logging.getLogger(__name__)


def sessions_for(app: PlatformCelery) -> sessionmaker[Session]:
    """Sessions on ``app``'s history database, where the outbox lives (shared per process)."""
    from tasks_platform.intake import intake_for  # noqa: PLC0415 - it imports the declarations

    if not app.settings.history_enabled:
        raise ConfigurationError(
            "the outbox lives in the history database, which is disabled "
            "(TASKS_HISTORY_ENABLED=false): enable it, or publish directly"
        )
    return intake_for(app).sessions


def apply_in_own_transaction(
    task: PlatformTask,
    args: tuple[Any, ...] | list[Any] | None,
    kwargs: dict[str, Any] | None,
    options: dict[str, Any],
) -> Any:
    """``task.apply_async(...)`` of an ``outbox=True`` job: committed to the outbox now."""
    options = dict(options)
    key = options.pop("idempotency_key", None)
    with sessions_for(task.app).begin() as session:
        submitted = enqueue(session, task, args, kwargs, key=key, options=options)
    return submitted.result or task.AsyncResult(submitted.id)
