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
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from billiard.exceptions import WorkerLostError
from celery import bootsteps
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded
from celery.utils.serialization import UnpickleableExceptionWrapper
from celery.worker.consumer import Consumer
from celery.worker.state import task_ready
from kombu.message import Message

from tasks_platform.deadletter import (
    DeadReason,
    Death,
    dead_letter,
    requeue_with_delivery,
    source_queue,
)
from tasks_platform.errors import InvalidPayload
from tasks_platform.event_sender import BUFFER_LIMIT as EVENT_BUFFER_LIMIT
from tasks_platform.event_sender import EventSender
from tasks_platform.history.models import JobState
from tasks_platform.history.recorder import record
from tasks_platform.history.writer import Transition
from tasks_platform.jobs.declaration import (
    DELIVERIES_HEADER,
    REPLAYS_HEADER,
    RETRY_OF_HEADER,
    PlatformTask,
)
from tasks_platform.jobs.retry import Verdict
from tasks_platform.limits.admission import LimitedRequest
from tasks_platform.settings import BrokerKind

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)


class PlatformRequest(LimitedRequest):
    """A Celery request whose final failure dead-letters the message before acking it (and
    that keeps to its tenant's limits: :class:`~tasks_platform.limits.admission.LimitedRequest`).
    """

    _failure: Any = None

    def admit_or_defer(self) -> None:
        """Acknowledge, without running it, a second publish of an outbox job or of a job with
        an idempotency key (see :mod:`tasks_platform.outbox.delivery`); then keep to the
        tenant's limits."""
        from tasks_platform.outbox.delivery import is_duplicate  # noqa: PLC0415 - imports jobs

        if not self.revoked() and is_duplicate(self):
            task_ready(self)
            self.acknowledge()
            raise TaskRevokedError(self.id)  # how the worker learns it did not go to the pool
        super().admit_or_defer()

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        # an ignored job (e.g. one that stopped because it was cancelled) is acknowledged as is
        ignored = isinstance(_unwrap(getattr(exc_info, "exception", None)), Ignore)
        self._failure = None if ignored else exc_info
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
        headers = self.request_dict or {}
        record_dead(self.app, self.id, death, headers=headers, worker=self.hostname)
        self.send_event(
            "task-dead-lettered",
            reason=death.reason.value,
            attempts=death.attempts,
            exception=f"{death.exception_type}: {death.exception_message}",
        )
        if getattr(self.task, "alert_on_dead", False):
            alert(self.name, self.id, death, self.send_event)
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
    """Celery's consumer, dead-lettering the messages it would drop, and publishing job events
    many jobs' at a time, at most every ``event_flush_interval`` seconds: on Redis from a thread
    of its own (:mod:`tasks_platform.event_sender`), on the other brokers from a timer in the
    event loop. Celery publishes its buffer on the very next loop turn instead: a publish for
    every job or two."""

    _event_sender: EventSender | None = None
    #: how buffered job events go out, decided at the first event: "thread" (Redis), "timer"
    #: (the other brokers) or "celery" (each loop turn: an interval of 0, or no event loop)
    _event_flush: str | None = None
    _event_interval = 0.0
    #: when the flush the loop's timer holds is due (time.monotonic())
    _event_flush_due = 0.0

    def on_send_event_buffered(self) -> None:  # called for every job event: kept cheap
        if self._event_flush is None:
            self._choose_event_flush()
        if self._event_flush == "celery":
            return super().on_send_event_buffered()  # type: ignore[no-any-return]
        dispatcher = self.event_dispatcher  # a new one after each reconnection
        if dispatcher is not None and dispatcher.buffer_limit < EVENT_BUFFER_LIMIT:
            dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        if self._event_sender is not None:
            self._event_sender.wake()
            return None
        now = time.monotonic()
        if now >= self._event_flush_due:  # no flush pending
            self._event_flush_due = now + self._event_interval
            self.hub.call_later(self._event_interval, self._flush_events)
        return None

    def _choose_event_flush(self) -> None:
        settings = cast("PlatformCelery", self.app).settings
        self._event_interval = settings.event_flush_interval
        if settings.broker_kind is BrokerKind.REDIS:
            self._event_flush = "thread"
            self._event_sender = EventSender(self._flush_events, interval=self._event_interval)
        elif self.hub is not None and self._event_interval > 0:
            self._event_flush = "timer"
        else:
            self._event_flush = "celery"

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        """The connection Celery's ``Events`` step (its only caller) publishes job events on;
        on RabbitMQ without publisher confirms. With them (the platform's setting for jobs)
        each publish of events waited for the broker's confirm, a round trip in the event
        loop's thread. Events are monitoring, not delivery: a publish is written to the socket
        and not waited for, as on the other brokers."""
        rabbitmq = cast("PlatformCelery", self.app).settings.broker_kind is BrokerKind.RABBITMQ
        options = {"confirm_publish": False} if rabbitmq else None
        connection = self.app.connection_for_write(
            url=url, heartbeat=heartbeat, transport_options=options
        )
        return self.ensure_connected(connection)

    def shutdown(self) -> None:
        # the last events go out before the connection closes; any later one goes Celery's way
        flush, self._event_flush = self._event_flush, "celery"
        sender, self._event_sender = self._event_sender, None
        if sender is not None:
            sender.stop()
        elif flush == "timer":
            try:
                self._flush_events()
            except Exception:
                logger.exception("could not publish the worker's last job events")
        super().shutdown()

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], Any]:
        """Celery's handler, guarded against two poison messages it lets through:

        * a body larger than ``max_message_bytes`` is dead-lettered unread (submit refuses
          payloads over ``max_payload_bytes``; only a raw publish brings a worker one this
          large);
        * a body that is not Celery's ``[args, kwargs, embed]`` makes Celery's request raise
          in the consumer, which stops the whole worker ("Unrecoverable error"), and the
          message, redelivered, stops the next one: it is dead-lettered instead.
        """
        handler = super().create_task_handler(*args, **kwargs)
        limit = cast("PlatformCelery", self.app).settings.max_message_bytes

        def on_task_received(message: Message) -> Any:
            size = len(message.body or b"")
            if size > limit:
                text = (f"message body is {size} bytes; the limit is {limit} bytes "
                        "(TASKS_MAX_MESSAGE_BYTES)")  # fmt: skip
                return self._dead_letter_message(
                    message, DeadReason.INVALID_MESSAGE, "MessageTooLarge", text
                )
            try:
                return handler(message)
            except (ValueError, TypeError) as exc:
                if message.acknowledged:
                    raise
                logger.exception("a malformed message broke the consumer; dead-lettering it")
                text = f"not a Celery job message: {exc.__class__.__name__}: {exc}"
                return self._dead_letter_message(
                    message, DeadReason.INVALID_MESSAGE, "MalformedMessage", text
                )

        return on_task_received

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
        if task_id and isinstance(headers, dict):
            app = cast("PlatformCelery", self.app)
            queue = source_queue(app.topology, message)
            record_dead(app, str(task_id), death, headers=headers, worker=self.hostname,
                        queue=queue)  # fmt: skip
        if self.event_dispatcher and task_id:
            self.event_dispatcher.send(
                "task-dead-lettered",
                uuid=task_id,
                reason=reason.value,
                attempts=1,
                exception=f"{exc_type}: {text}",
            )
        if task_id and isinstance(headers, dict):
            self._alert_if_declared(str(headers.get("task")), str(task_id), death)

    def _alert_if_declared(self, name: str, task_id: str, death: Death) -> None:
        if not getattr(self.app.tasks.get(name), "alert_on_dead", False):
            return

        def send(kind: str, **fields: Any) -> None:
            if self.event_dispatcher:
                self.event_dispatcher.send(kind, uuid=task_id, **fields)

        alert(name, task_id, death, send)


def alert(name: str, task_id: str, death: Death, send_event: Callable[..., Any]) -> None:
    """Raise the alert of a job type declared ``alert_on_dead``: a CRITICAL line and an event.

    The line starts ``ALERT: <job name> job <id> dead-lettered: <reason>``; the Celery event
    is ``task-alert`` (job name, reason, attempts, exception) for monitors that page someone.
    """
    exception = f"{death.exception_type}: {death.exception_message}"
    logger.critical(
        "ALERT: %s job %s dead-lettered: %s after %d attempt(s): %s",
        name,
        task_id,
        death.reason.value,
        death.attempts,
        exception,
    )
    try:
        send_event(
            "task-alert",
            job=name,
            reason=death.reason.value,
            attempts=death.attempts,
            exception=exception,
        )
    except Exception:
        logger.exception("could not send the task-alert event of %s[%s]", name, task_id)


def record_dead(
    app: PlatformCelery,
    task_id: str,
    death: Death,
    *,
    headers: dict[str, Any],
    worker: str | None,
    queue: str | None = None,
) -> None:
    """Tell the history that ``task_id`` is in its dead-letter queue, and why."""
    attempt = int(headers.get("retries") or 0) + 1
    facts: dict[str, Any] = {
        "name": headers.get("task"),
        "dead_reason": death.reason.value,
        "error_type": death.exception_type,
        "error_message": death.exception_message,
        "error_traceback": death.traceback or None,
    }
    if queue is not None:
        facts["queue"] = queue
    # what identifies the job, in case this is the first of its transitions to be written
    for fact, header in (("tenant", "tenant"), ("idempotency_key", "idempotency_key"),
                         ("retry_of", RETRY_OF_HEADER)):  # fmt: skip
        if headers.get(header) is not None:
            facts[fact] = headers[header]
    detail = {"reason": death.reason.value, "attempts": death.attempts}
    replays = int(headers.get(REPLAYS_HEADER) or 0)
    record(app, Transition(task_id, JobState.DEAD, attempt, time.time(), replays=replays,
                           worker=worker, facts=facts, detail=detail))  # fmt: skip


class DeclareDeadLetterQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """Declares ``tasks.dead`` and every ``Q.dead`` when the worker's consumer starts."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        topology = cast("PlatformCelery", c.app).topology
        channel = c.connection.default_channel
        for queue in topology.dead_queues():
            queue(channel).declare()
