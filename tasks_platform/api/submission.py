"""Submitting a job through the API: validated, owned by a tenant, idempotent by key.

The mechanism is the platform's own (:mod:`tasks_platform.intake`): the job's history row is
written before its message is published, so that the job can be read (and its tenant checked)
the moment its id is returned, and an idempotency key claims the job's id through that row. A
key that comes back with another job type is a 409 (``idempotency_conflict``; and
``idempotency_in_flight`` while another submission with the key keeps failing to publish).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.api.errors import Conflict
from tasks_platform.errors import IdempotencyConflict
from tasks_platform.intake import Intake, Submitted, declared_task
from tasks_platform.topology import Priority

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery


class Submissions:
    """Submits jobs of ``app`` and records them in the history behind ``sessions``."""

    def __init__(self, app: PlatformCelery, sessions: sessionmaker[Session]) -> None:
        self.app = app
        self.intake = Intake(sessions)

    def submit(
        self,
        name: str,
        payload: dict[str, Any],
        *,
        priority: Priority | None = None,
        tenant: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Validate, record and queue a job; InvalidPayload/UnknownJob/Conflict refuse it."""
        task = declared_task(self.app, name)
        level = priority or task.platform_priority
        try:
            return self.intake.submit(
                task,
                kwargs=payload,
                key=idempotency_key,
                tenant=tenant,
                options={"priority": level.value},
            )
        except IdempotencyConflict as exc:
            raise Conflict(str(exc), code=exc.code) from exc
