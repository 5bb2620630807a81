"""Dead-lettering a message, and publishing one back to its work queue."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kombu.message import Message

from tasks_platform.deadletter.letters import HEADER_PREFIX, Death
from tasks_platform.jobs.declaration import DELIVERIES_HEADER, REPLAYS_HEADER
from tasks_platform.topology import Topology

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

_PUBLISH_RETRY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}


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
    publish_work(app, message, family, headers)


def publish_work(
    app: PlatformCelery, message: Message, family: str, headers: dict[str, Any]
) -> None:
    """Publish ``message`` with ``headers`` to the work queue of ``family``, at its priority."""
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


def replay_headers(message: Message) -> dict[str, Any]:
    """The headers of ``message`` replayed: death marks dropped, retries reset, replays + 1."""
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
