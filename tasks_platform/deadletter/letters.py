"""What a dead letter says: the headers a death adds, and a received letter read back."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kombu.message import Message

from tasks_platform.fingerprint import fingerprint as error_fingerprint

HEADER_PREFIX = "x-dead-"
_TEXT_LIMIT = 2_000
_TRACEBACK_LIMIT = 16_000


class DeadReason(StrEnum):
    RETRIES_EXHAUSTED = "retries_exhausted"
    PERMANENT_ERROR = "permanent_error"
    TIME_LIMIT = "time_limit"
    POISON = "poison"
    UNDECODABLE = "undecodable"
    UNKNOWN_TASK = "unknown_task"
    INVALID_MESSAGE = "invalid_message"
    #: dead-lettered by RabbitMQ itself (rejected, expired, over length ...)
    BROKER = "broker"


@dataclass(frozen=True)
class Death:
    """Why a job is being dead-lettered."""

    reason: DeadReason
    exception_type: str
    exception_message: str
    traceback: str
    attempts: int

    def headers(self, queue: str) -> dict[str, Any]:
        return {
            "x-dead-reason": self.reason.value,
            "x-dead-exception-type": self.exception_type,
            "x-dead-exception": bounded(self.exception_message, _TEXT_LIMIT),
            "x-dead-traceback": bounded(self.traceback, _TRACEBACK_LIMIT),
            "x-dead-attempts": self.attempts,
            "x-dead-queue": queue,
            "x-dead-at": time.time(),
        }


@dataclass(frozen=True)
class DeadLetter:
    """A message sitting in a dead-letter queue, as an operator sees it."""

    task_id: str | None
    job: str | None
    queue: str
    reason: str
    exception_type: str
    exception_message: str
    traceback: str
    attempts: int
    dead_at: float | None
    content_type: str | None
    payload: Any
    headers: dict[str, Any] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """The error fingerprint this letter is grouped by."""
        return error_fingerprint(self.job, self.exception_type, self.exception_message)

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "job": self.job,
            "queue": self.queue,
            "reason": self.reason,
            "exception_type": self.exception_type,
            "exception_message": self.exception_message,
            "fingerprint": self.fingerprint,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "dead_at": self.dead_at,
            "content_type": self.content_type,
            "payload": self.payload,
        }


def read_letter(family: str, message: Message) -> DeadLetter:
    """What a message taken from ``family``'s dead-letter queue says (RabbitMQ's own too)."""
    headers = dict(message.headers or {})
    reason = headers.get("x-dead-reason")
    exception_type = headers.get("x-dead-exception-type", "")
    if reason is None:
        deaths = headers.get("x-death") or [{}]
        reason = DeadReason.BROKER.value
        exception_type = f"rabbitmq:{deaths[0].get('reason', 'unknown')}"
    return DeadLetter(
        task_id=headers.get("id"),
        job=headers.get("task"),
        queue=family,
        reason=str(reason),
        exception_type=str(exception_type),
        exception_message=str(headers.get("x-dead-exception", "")),
        traceback=str(headers.get("x-dead-traceback", "")),
        attempts=int(headers.get("x-dead-attempts") or int(headers.get("retries") or 0) + 1),
        dead_at=headers.get("x-dead-at"),
        content_type=message.content_type,
        payload=_payload(message),
        headers=headers,
    )


def _payload(message: Message) -> Any:
    """The message body for display: parsed JSON, never unpickled."""
    body = message.body or b""
    raw = body.encode("utf-8", "replace") if isinstance(body, str) else bytes(body)
    if message.content_type != "application/json":
        return {"undisplayable": f"{len(raw)} bytes of {message.content_type}"}
    try:
        return json.loads(raw)
    except ValueError:
        return {"undecodable": repr(raw[:200])}


def bounded(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, saying so when it was cut."""
    return text if len(text) <= limit else text[: limit - 20] + "\n... (truncated)"
