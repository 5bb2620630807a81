"""Dead letters: how hopeless jobs reach ``<queue>.dead``, and the API to inspect, replay, purge.

Every work queue ``Q`` has a dead-letter queue ``Q.dead`` bound to the exchange ``tasks.dead``.
When the worker gives up on a job (retries exhausted, permanent error, time limit, poison,
undecodable or unknown message) it publishes the *original* message body to ``tasks.dead``
with these headers added, waits for the broker to confirm, and only then acknowledges the
original::

    x-dead-reason          retries_exhausted | permanent_error | time_limit | poison | ...
    x-dead-exception-type  e.g. "ValueError"
    x-dead-exception       the exception message (bounded)
    x-dead-traceback       the traceback (bounded)
    x-dead-attempts        how many times the job ran
    x-dead-queue           the work queue it came from
    x-dead-at              unix time

A worker killed between the publish and the acknowledgement leaves a second copy behind
(at-least-once); both carry the same task id, so they are recognisable.

On RabbitMQ the work queues also carry ``x-dead-letter-exchange`` arguments, so that anything
the broker itself rejects without requeue or expires is dead-lettered by the broker (those
letters carry RabbitMQ's ``x-death`` header instead of ours). RabbitMQ cannot add headers
when it dead-letters, which is why the worker publishes the enriched copy itself.

Inspecting a queue of dead letters takes its messages without acknowledging them and puts
back those not acted upon, so a listing briefly reorders the queue; nobody consumes
dead-letter queues, so that is harmless.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection
from kombu.message import Message

from tasks_platform.errors import DeadLetterNotFound, UnknownQueue
from tasks_platform.jobs.declaration import DELIVERIES_HEADER
from tasks_platform.topology import DEAD_SUFFIX, QUEUES, Topology

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

HEADER_PREFIX = "x-dead-"
REPLAYS_HEADER = "x-tasks-replays"
_TEXT_LIMIT = 2_000
_TRACEBACK_LIMIT = 16_000
_PUBLISH_RETRY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}


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
            "x-dead-exception": _bounded(self.exception_message, _TEXT_LIMIT),
            "x-dead-traceback": _bounded(self.traceback, _TRACEBACK_LIMIT),
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "job": self.job,
            "queue": self.queue,
            "reason": self.reason,
            "exception_type": self.exception_type,
            "exception_message": self.exception_message,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "dead_at": self.dead_at,
            "content_type": self.content_type,
            "payload": self.payload,
        }


def source_queue(topology: Topology, message: Message) -> str:
    """The work queue (family) a received message came from."""
    delivery = message.delivery_info or {}
    for key in ("routing_key", "queue"):
        family = topology.family_of(str(delivery.get(key) or ""))
        if family is not None:
            return family
    return "default"


def dead_letter(app: PlatformCelery, message: Message, death: Death) -> None:
    """Publish ``message`` to its dead-letter queue, confirmed. The caller acks the original."""
    topology = app.topology
    family = source_queue(topology, message)
    dead_queue = topology.dead_queue(family)
    headers = dict(message.headers or {})
    headers.update(death.headers(topology.queue_name(family)))
    with _producer(app) as producer:
        producer.publish(
            message.body,
            exchange=topology.dead_exchange,
            routing_key=dead_queue.routing_key,
            headers=headers,
            content_type=message.content_type or "application/octet-stream",
            content_encoding=message.content_encoding or "binary",
            delivery_mode=2,
            declare=[dead_queue],
            retry=True,
            retry_policy=_PUBLISH_RETRY,
        )


def requeue_with_delivery(app: PlatformCelery, message: Message, deliveries: int) -> None:
    """Publish ``message`` back to its work queue counting one more delivery (poison guard)."""
    topology = app.topology
    family = source_queue(topology, message)
    headers = dict(message.headers or {})
    headers[DELIVERIES_HEADER] = deliveries
    _publish_work(app, message, family, headers)


def _publish_work(
    app: PlatformCelery, message: Message, family: str, headers: dict[str, Any]
) -> None:
    topology = app.topology
    work_queue = topology.work_queue(family)
    priority = (message.properties or {}).get("priority")
    with _producer(app) as producer:
        producer.publish(
            message.body,
            exchange=topology.work_exchange,
            routing_key=work_queue.routing_key,
            headers=headers,
            content_type=message.content_type or "application/octet-stream",
            content_encoding=message.content_encoding or "binary",
            priority=priority,
            delivery_mode=2,
            declare=[work_queue],
            retry=True,
            retry_policy=_PUBLISH_RETRY,
        )


@contextmanager
def _producer(app: PlatformCelery) -> Iterator[Any]:
    """A producer on a connection of its own, closed after use.

    Not the app's pool: in a prefork worker every new pool process closes its inherited copies
    of the pooled connections (kombu's after-fork clean-up), which closes them at the broker
    under the main process; a publish then fails half-way and, retried, lands twice.
    """
    with app.connection_for_write() as connection:
        yield connection.Producer()


class DeadLetters:
    """List, show, replay and purge dead letters."""

    def __init__(self, app: PlatformCelery) -> None:
        self.app = app
        self.topology: Topology = app.topology

    def counts(self) -> dict[str, int]:
        """Number of dead letters per queue (family)."""
        with self._channel() as channel:
            return {
                family: int(self.topology.dead_queue(family)(channel).queue_declare().message_count)
                for family in QUEUES
            }

    def list(self, queue: str | None = None, *, limit: int = 100) -> builtins.list[DeadLetter]:
        found: builtins.list[DeadLetter] = []
        for family in self._families(queue):
            found += self._scan(family, limit=limit - len(found), act=None)
            if len(found) >= limit:
                break
        return found

    def show(self, task_id: str) -> DeadLetter:
        for family in QUEUES:
            letters = [
                letter for letter in self._scan(family, act=None) if letter.task_id == task_id
            ]
            if letters:
                return letters[0]
        raise DeadLetterNotFound(f"no dead letter with task id {task_id!r}")

    def replay(self, *, task_id: str | None = None, queue: str | None = None) -> builtins.list[str]:
        """Re-publish dead letters to their work queue (attempts reset); returns their ids.

        With ``task_id`` every copy of that job is replayed once (copies share the id); with
        ``queue`` that whole queue; with neither, every dead-letter queue.
        """
        replayed: builtins.list[str] = []

        def act(message: Message, letter: DeadLetter) -> None:
            if letter.task_id is not None and letter.task_id in replayed:
                return  # a duplicate copy of a job already replayed: drop it
            _publish_work(self.app, message, letter.queue, _replay_headers(message))
            replayed.append(letter.task_id or "")

        self._act(task_id=task_id, queue=queue, act=act)
        if task_id is not None and not replayed:
            raise DeadLetterNotFound(f"no dead letter with task id {task_id!r}")
        return replayed

    def purge(self, *, task_id: str | None = None, queue: str | None = None) -> int:
        """Delete dead letters for good; returns how many messages were removed."""
        removed = 0

        def act(message: Message, letter: DeadLetter) -> None:
            nonlocal removed
            removed += 1

        self._act(task_id=task_id, queue=queue, act=act)
        if task_id is not None and not removed:
            raise DeadLetterNotFound(f"no dead letter with task id {task_id!r}")
        return removed

    # -- internals ---------------------------------------------------------------------------
    def _act(
        self,
        *,
        task_id: str | None,
        queue: str | None,
        act: Callable[[Message, DeadLetter], None],
    ) -> None:
        for family in self._families(queue):
            self._scan(family, act=act, select=None if task_id is None else task_id)

    def _families(self, queue: str | None) -> tuple[str, ...]:
        if queue is None:
            return QUEUES
        family = queue.removesuffix(DEAD_SUFFIX).removeprefix(self.topology.prefix)
        try:
            self.topology.check_family(family)
        except ValueError as exc:
            raise UnknownQueue(str(exc)) from None
        return (family,)

    @contextmanager
    def _channel(self) -> Iterator[Any]:
        with self.app.connection_for_write() as connection:
            assert isinstance(connection, Connection)
            channel = connection.channel()
            try:
                yield channel
            finally:
                channel.close()

    def _scan(
        self,
        family: str,
        *,
        act: Callable[[Message, DeadLetter], None] | None,
        select: str | None = None,
        limit: int = 1_000_000,
    ) -> builtins.list[DeadLetter]:
        """Take the queue's messages; ``act`` on (and ack) the selected ones; put back the rest."""
        seen: builtins.list[DeadLetter] = []
        held: builtins.list[Message] = []
        with self._channel() as channel:
            queue = self.topology.dead_queue(family)(channel)
            queue.declare()
            try:
                while len(seen) < limit:
                    message = queue.get(no_ack=False)
                    if message is None:
                        break
                    letter = read_letter(family, message)
                    if act is not None and (select is None or letter.task_id == select):
                        act(message, letter)
                        message.ack()
                    else:
                        held.append(message)
                    seen.append(letter)
            finally:
                for message in held:
                    message.requeue()
        return seen


def read_letter(family: str, message: Message) -> DeadLetter:
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


def _replay_headers(message: Message) -> dict[str, Any]:
    headers = {
        key: value
        for key, value in dict(message.headers or {}).items()
        if not key.startswith(HEADER_PREFIX) and key not in ("x-death", DELIVERIES_HEADER)
    }
    headers[REPLAYS_HEADER] = int(headers.get(REPLAYS_HEADER) or 0) + 1
    if "retries" in headers:
        headers["retries"] = 0
    headers.pop("eta", None)
    headers.pop("expires", None)
    return headers


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 20] + "\n... (truncated)"
