"""Live figures from the broker: queue depths per priority, and who consumes which queue.

Redis keeps one list per queue and priority step: kombu names it ``queue`` for step 0 and
``queue + sep + str(step)`` for the others (``sep`` is ``'\\x06\\x16'``, see
``kombu.transport.redis.Channel._q_for_pri``), so the depth of each priority is the length of
its list. RabbitMQ only reports a queue's total (a passive ``queue.declare``), and so does the
embedded broker (which has no priorities): their depth is reported under priority ``all``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tasks_platform.settings import BrokerKind
from tasks_platform.stats.snapshot import ALL_PRIORITIES, QueueDepth
from tasks_platform.topology import QUEUES, REDIS_PRIORITY_STEPS, Topology

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

log = logging.getLogger(__name__)

#: kombu's separator between a Redis queue name and its priority step
REDIS_PRIORITY_SEPARATOR = "\x06\x16"
INSPECT_TIMEOUT = 1.0


def redis_list_name(queue: str, step: int, separator: str = REDIS_PRIORITY_SEPARATOR) -> str:
    """The Redis list kombu keeps the messages of ``queue`` at priority ``step`` in."""
    return f"{queue}{separator}{step}" if step else queue


def queue_depths(connection: Any, topology: Topology) -> list[QueueDepth]:
    """Messages waiting in every work queue, per priority where the broker can tell."""
    if topology.broker_kind is BrokerKind.REDIS:
        return _redis_depths(connection, topology)
    return [
        QueueDepth(family, ALL_PRIORITIES, _message_count(connection, topology, family))
        for family in QUEUES
    ]


def _redis_depths(connection: Any, topology: Topology) -> list[QueueDepth]:
    channel = connection.default_channel
    separator = getattr(channel, "sep", REDIS_PRIORITY_SEPARATOR)
    keys = [
        (family, step, redis_list_name(topology.queue_name(family), step, separator))
        for family in QUEUES
        for step in REDIS_PRIORITY_STEPS
    ]
    with channel.client.pipeline() as pipe:
        for _family, _step, key in keys:
            pipe.llen(key)
        lengths = pipe.execute()
    return [
        QueueDepth(family, topology.priority_name(step).value, int(length))
        for (family, step, _key), length in zip(keys, lengths, strict=True)
    ]


def _message_count(connection: Any, topology: Topology, family: str) -> int:
    """A passive declare's message count; 0 (logged) when the queue was never declared."""
    channel = connection.channel()  # RabbitMQ closes a channel whose passive declare fails
    try:
        queue = topology.work_queue(family)(channel)
        return int(queue.queue_declare(passive=True).message_count)
    except connection.channel_errors as exc:
        log.warning("work queue %s cannot be read (%s): counted as empty", family, exc)
        return 0
    finally:
        _close_quietly(connection, channel)


def _close_quietly(connection: Any, channel: Any) -> None:
    try:
        channel.close()
    except (*connection.connection_errors, *connection.channel_errors) as exc:
        log.debug("closing a stats channel failed: %s", exc)


def queue_consumers(app: PlatformCelery) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """Which workers consume each work queue, and every worker that answered.

    Workers that do not answer within a second count as absent; no answer at all means no
    worker (Celery's inspect returns None then).
    """
    replies = app.control.inspect(timeout=INSPECT_TIMEOUT).active_queues() or {}
    consumers: dict[str, list[str]] = {family: [] for family in QUEUES}
    for worker, queues in sorted(replies.items()):
        for info in queues or ():
            family = app.topology.family_of(str(info.get("name", "")))
            if family is not None:
                consumers[family].append(worker)
    return {family: tuple(names) for family, names in consumers.items()}, tuple(sorted(replies))
