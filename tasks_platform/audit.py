"""The audit log: who did what to which job, queue or token, when and why."""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from tasks_platform.history.models import AuditEntry
from tasks_platform.settings import Settings


def record_action(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one audit entry to ``session``; the caller commits it with the action itself."""
    session.add(
        AuditEntry(
            at=datetime.now(UTC),
            actor=actor,
            action=action,
            target=target,
            reason=reason,
            detail=detail,
        )
    )


def actor_from_environment(settings: Settings) -> str:
    """Who runs a command line action: ``TASKS_ACTOR`` if set, else the operating system user."""
    if settings.actor and settings.actor.strip():
        return settings.actor.strip()
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (some containers)
        return f"cli:uid-{os.getuid()}"
