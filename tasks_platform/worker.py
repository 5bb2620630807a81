"""The worker side of dead-lettering: what happens to a job Celery would otherwise drop.

Celery's own behaviour, and what the platform does instead:

* a job that fails for good is acknowledged (gone): the platform publishes it to its
  dead-letter queue first (:class:`PlatformRequest`);
* a job whose pool process died is requeued forever (``reject_on_worker_lost``): the platform
  counts deliveries in a header and dead-letters it as ``poison`` after ``max_deliveries``;
* an undecodable message is acknowledged and an unknown task rejected (deleted on Redis):
  the platform dead-letters both (:class:`PlatformConsumer`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from billiard.exceptions import WorkerLostError
from celery import bootsteps
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.utils.serialization import UnpickleableExceptionWrapper
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.message import Message

from tasks_platform.deadletter import DeadReason, Death, dead_letter, requeue_with_delivery
from tasks_platform.errors import InvalidPayload
from tasks_platform.jobs.declaration import DELIVERIES_HEADER, PlatformTask
from tasks_platform.jobs.retry import Verdict

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)


class PlatformRequest(Request):  # type: ignore[misc]
    """A Celery request whose final failure dead-letters the message before acking it."""

    _failure: Any = None

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        self._failure = exc_info
        try:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        finally:
            self._failure = None

    def on_retry(self, exc_info: Any) -> Any:
        self._failure = None  # a retry is acknowledged as usual: the retry message is queued
        return super().on_retry(exc_info)

    def _success_was_stored(self) -> Any:
        meta = super()._success_was_stored()
        if meta:
            self._failure = None  # the job succeeded before its process was lost
        return meta

    def acknowledge(self) -> None:
        failure = self._failure
        if (
            failure is not None
            and not self.acknowledged
            and not self._dead_letter(self._death(failure))
        ):
            return  # not acknowledged: the broker redelivers it later
        super().acknowledge()

    def reject(self, requeue: bool = False) -> None:
        failure, self._failure = self._failure, None
        if failure is None or self.acknowledged:
            return super().reject(requeue)  # type: ignore[no-any-return]
        exc = _unwrap(failure.exception)
        if requeue and isinstance(exc, WorkerLostError):
            deliveries = int((self.message.headers or {}).get(DELIVERIES_HEADER) or 1)
            if deliveries < self.app.settings.max_deliveries:
                try:
                    requeue_with_delivery(self.app, self.message, deliveries + 1)
                except Exception:
                    logger.exception("could not requeue %s after its worker was lost", self.id)
                    return super().reject(requeue)  # type: ignore[no-any-return]
                logger.warning(
                    "job %s[%s] lost its worker process (%d of %d deliveries); requeued",
                    self.name,
                    self.id,
                    deliveries,
                    self.app.settings.max_deliveries,
                )
                return super().acknowledge()  # type: ignore[no-any-return]
            death = self._death(failure, reason=DeadReason.POISON, attempts=deliveries)
        else:
            death = self._death(failure)
        if self._dead_letter(death):
            super().acknowledge()
        return None

    # -- helpers -----------------------------------------------------------------------------
    @property
    def app(self) -> PlatformCelery:
        return cast("PlatformCelery", self.task.app)

    def _dead_letter(self, death: Death) -> bool:
        try:
            dead_letter(self.app, self.message, death)
        except Exception:
            logger.exception(
                "could not dead-letter %s[%s]; leaving it unacknowledged", self.name, self.id
            )
            return False
        logger.error(
            "job %s[%s] dead-lettered (%s after %d attempt(s)): %s: %s",
            self.name,
            self.id,
            death.reason.value,
            death.attempts,
            death.exception_type,
            death.exception_message,
        )
        self.send_event(
            "task-dead-lettered",
            reason=death.reason.value,
            attempts=death.attempts,
            exception=f"{death.exception_type}: {death.exception_message}",
        )
        return True

    def _death(
        self, exc_info: Any, *, reason: DeadReason | None = None, attempts: int | None = None
    ) -> Death:
        exc = _unwrap(exc_info.exception)
        retries = int(getattr(self._context, "retries", 0) or 0)
        exc_type, message = _describe(exc)
        return Death(
            reason=reason or self._reason(exc, retries),
            exception_type=exc_type,
            exception_message=message,
            traceback=str(getattr(exc_info, "traceback", "") or ""),
            attempts=attempts if attempts is not None else retries + 1,
        )

    def _reason(self, exc: BaseException, retries: int) -> DeadReason:
        if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
            return DeadReason.TIME_LIMIT
        if isinstance(exc, InvalidPayload):
            return DeadReason.PERMANENT_ERROR
        task = self.task
        if isinstance(task, PlatformTask):
            verdict = task.effective_retry_policy().decide(exc, retries).verdict
            if verdict is Verdict.PERMANENT:
                return DeadReason.PERMANENT_ERROR
            return DeadReason.RETRIES_EXHAUSTED
        if type(exc).__name__ in {"ContentDisallowed", "DecodeError", "EncodeError"}:
            return DeadReason.UNDECODABLE
        return DeadReason.PERMANENT_ERROR


def _unwrap(exc: Any) -> Any:
    return getattr(exc, "exc", exc) if type(exc).__name__ == "ExceptionWithTraceback" else exc


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, UnpickleableExceptionWrapper):
        return str(exc.exc_cls_name), str(exc.exc_msg)
    return type(exc).__name__, str(exc)


class PlatformConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, dead-lettering the messages it would drop."""

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self._dead_letter_message(
            message,
            DeadReason.INVALID_MESSAGE,
            "UnknownMessage",
            "message has no task header and is not a Celery message",
        )

    def on_unknown_task(self, body: Any, message: Message, exc: BaseException) -> None:
        name = (message.headers or {}).get("task", "?")
        self._dead_letter_message(
            message, DeadReason.UNKNOWN_TASK, "NotRegistered", f"no job type named {name!r}"
        )

    def on_invalid_task(self, body: Any, message: Message, exc: BaseException) -> None:
        self._dead_letter_message(message, DeadReason.INVALID_MESSAGE, *_describe(exc))

    def on_decode_error(self, message: Message, exc: BaseException) -> None:
        self._dead_letter_message(message, DeadReason.UNDECODABLE, *_describe(exc))

    def _dead_letter_message(
        self, message: Message, reason: DeadReason, exc_type: str, text: str
    ) -> None:
        headers = message.headers or {}
        task_id = headers.get("id") if isinstance(headers, dict) else None
        death = Death(
            reason=reason, exception_type=exc_type, exception_message=text, traceback="", attempts=1
        )
        try:
            dead_letter(cast("PlatformCelery", self.app), message, death)
        except Exception:
            logger.exception("could not dead-letter message %s; leaving it unacknowledged", task_id)
            return
        logger.error("message %s dead-lettered: %s: %s", task_id, exc_type, text)
        message.ack()
        if self.event_dispatcher and task_id:
            self.event_dispatcher.send(
                "task-dead-lettered",
                uuid=task_id,
                reason=reason.value,
                attempts=1,
                exception=f"{exc_type}: {text}",
            )


class DeclareDeadLetterQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """Declares ``tasks.dead`` and every ``Q.dead`` when the worker's consumer starts."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        topology = cast("PlatformCelery", c.app).topology
        channel = c.connection.default_channel
        for queue in topology.dead_queues():
            queue(channel).declare()
