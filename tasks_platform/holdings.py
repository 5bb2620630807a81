"""Where jobs are held right now: the task ids the broker and the workers have (for reconcile).

A job that is not finished is somewhere: waiting in its work queue, in a dead-letter queue,
delivered to a worker (running, reserved, or held for its countdown/ETA), in Redis' *unacked*
hash (delivered, not yet acknowledged: kombu hands it out again after the visibility timeout,
even if its worker died), or in the tenant-limits deferred set. :func:`take_stock` looks in
every one of those places and returns the ids it found, where, and what it could not see:

* **Redis**: every priority list of every work and dead-letter queue is read (``LRANGE``, no
  message moves), and the ``unacked`` hash of the broker's database;
* **RabbitMQ**: a queue cannot be read without taking its messages, so each queue's ready
  messages are taken unacknowledged on a channel of their own and put back by closing it
  (RabbitMQ requeues them in place, marked redelivered). For that moment a worker cannot
  take them; a queue deeper than ``max_scan`` is not read at all. A message a live worker
  holds is only visible through that worker: a work queue with more consumers than workers
  answering the inspection is *blind* (its jobs cannot be called lost);
* **workers**: ``ping`` says who is there; ``inspect`` ``active``, ``reserved``, ``scheduled``
  (countdown/ETA) and ``active_queues`` are then asked of exactly those workers.

The embedded file broker is not supported: a worker takes a message out of the broker's
folder when it receives it, so a job held by a worker that does not answer and a lost job look
the same. Extra places (the outbox of jobs accepted but not yet published) plug in as
:class:`Holder` callables.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kombu.utils.json import loads

from tasks_platform.errors import ConfigurationError
from tasks_platform.settings import BrokerKind
from tasks_platform.stats.broker import REDIS_PRIORITY_SEPARATOR, redis_list_name
from tasks_platform.topology import QUEUES, REDIS_PRIORITY_STEPS

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)

#: messages read from one queue at most; a deeper queue is not read (its jobs are not judged)
DEFAULT_MAX_SCAN = 20_000
#: seconds to wait for the workers' answers to ``ping``
DEFAULT_INSPECT_TIMEOUT = 2.0
_HSCAN_COUNT = 500
_LRANGE_CHUNK = 1_000

#: an extra place that may hold jobs: given candidate ids, the ones it holds, and where
Holder = Callable[[frozenset[str]], dict[str, str]]


@dataclass
class Stock:
    """What one look found: task id -> where it is held, and the queues it could not see."""

    held: dict[str, str] = field(default_factory=dict)
    #: work queue (family) -> why its jobs cannot be judged
    blind: dict[str, str] = field(default_factory=dict)
    workers: tuple[str, ...] = ()

    def hold(self, task_id: object, where: str) -> None:
        if isinstance(task_id, str) and task_id:
            self.held.setdefault(task_id, where)


def check_supported(app: PlatformCelery) -> None:
    """ConfigurationError on the embedded broker, which cannot be reconciled (see above)."""
    if app.settings.broker_kind is BrokerKind.FILESYSTEM:
        raise ConfigurationError(
            "reconcile needs a Redis or RabbitMQ broker: the embedded file broker removes a "
            "message from its folder when a worker takes it, so a job held by a worker that "
            "does not answer cannot be told from a lost one"
        )


def take_stock(
    app: PlatformCelery,
    *,
    max_scan: int = DEFAULT_MAX_SCAN,
    inspect_timeout: float = DEFAULT_INSPECT_TIMEOUT,
    holders: Iterable[Holder] = (),
    candidates: frozenset[str] = frozenset(),
) -> Stock:
    """Look everywhere a job can be held: the broker first, then the workers (see module).

    The broker is read before the workers are asked: a job moving from a queue to a worker
    meanwhile is then seen at least once. Broker errors propagate.
    """
    check_supported(app)
    stock = Stock()
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=2, interval_start=0.5, timeout=5)
        if app.settings.broker_kind is BrokerKind.REDIS:
            _redis(connection, app, stock, max_scan)
            consumers: dict[str, int] = {}
        else:
            consumers = _rabbitmq(connection, app, stock, max_scan)
    _deferred(app, stock)
    _workers(app, stock, inspect_timeout, consumers)
    for holder in holders:
        for task_id, where in holder(candidates).items():
            stock.hold(task_id, where)
    return stock


# -- Redis ---------------------------------------------------------------------------------------
def _redis(connection: Any, app: PlatformCelery, stock: Stock, max_scan: int) -> None:
    channel = connection.default_channel
    client = channel.client
    separator = getattr(channel, "sep", REDIS_PRIORITY_SEPARATOR)
    topology = app.topology
    for family in QUEUES:
        for kind, name in (("queue", topology.queue_name(family)),
                           ("dead", topology.dead_queue(family).name)):  # fmt: skip
            lists = [redis_list_name(name, step, separator) for step in REDIS_PRIORITY_STEPS]
            depth = sum(int(client.llen(key)) for key in lists)
            if depth > max_scan:
                stock.blind[family] = f"{name} holds {depth} messages (> {max_scan})"
                continue
            for key in lists:
                for raw in _lrange(client, key):
                    stock.hold(_redis_message_id(raw), f"{kind}:{family}")
    unacked_key = getattr(channel, "unacked_key", "unacked")
    for _field, raw in client.hscan_iter(unacked_key, count=_HSCAN_COUNT):
        try:
            message = loads(raw)[0]
        except (ValueError, TypeError, IndexError, KeyError):
            continue
        stock.hold(_redis_message_id(message), "redis-unacked")


def _lrange(client: Any, key: str) -> Iterable[Any]:
    start = 0
    while True:
        chunk = client.lrange(key, start, start + _LRANGE_CHUNK - 1)
        yield from chunk
        if len(chunk) < _LRANGE_CHUNK:
            return
        start += _LRANGE_CHUNK


def _redis_message_id(raw: Any) -> object:
    """The task id in a kombu Redis message (JSON text, or the decoded mapping)."""
    try:
        message = raw if isinstance(raw, dict) else json.loads(raw)
        headers = message.get("headers") or {}
        return headers.get("id") or (message.get("properties") or {}).get("correlation_id")
    except (ValueError, TypeError, AttributeError):
        return None


# -- RabbitMQ ------------------------------------------------------------------------------------
def _rabbitmq(connection: Any, app: PlatformCelery, stock: Stock, max_scan: int) -> dict[str, int]:
    """Read every queue (messages put back); the number of consumers of each work queue."""
    consumers: dict[str, int] = {}
    topology = app.topology
    for family in QUEUES:
        for kind, queue in (("queue", topology.work_queue(family)),
                            ("dead", topology.dead_queue(family))):  # fmt: skip
            channel = connection.channel()
            try:
                bound = queue(channel)
                declared = bound.queue_declare(passive=True)
                depth = int(declared.message_count)
                if kind == "queue":
                    consumers[family] = int(declared.consumer_count)
                if depth > max_scan:
                    stock.blind[family] = f"{queue.name} holds {depth} messages (> {max_scan})"
                    continue
                for _ in range(depth):
                    message = bound.get(no_ack=False)
                    if message is None:
                        break
                    stock.hold((message.headers or {}).get("id"), f"{kind}:{family}")
            except connection.channel_errors as exc:
                logger.warning("queue %s cannot be read (%s): not judged", queue.name, exc)
                stock.blind[family] = f"{queue.name} cannot be read: {exc}"
            finally:
                _close(connection, channel)  # puts every message taken back in place
    return consumers


def _close(connection: Any, channel: Any) -> None:
    try:
        channel.close()
    except (*connection.connection_errors, *connection.channel_errors) as exc:
        logger.warning("closing a reconcile channel failed (%s): its messages are requeued "
                       "when the connection closes", exc)  # fmt: skip


# -- tenant limits -------------------------------------------------------------------------------
def _deferred(app: PlatformCelery, stock: Stock) -> None:
    """Jobs waiting in the tenant-limits deferred set (only where limits are configured)."""
    if not app.settings.tenant_limits:
        return
    from tasks_platform.limits.store import job_of, limits_for  # noqa: PLC0415 - needs redis

    limits = limits_for(app.settings)
    for member in limits.client.zrange(limits.deferred_key, 0, -1):
        text = member.decode() if isinstance(member, bytes) else str(member)
        try:
            options = job_of(text).get("options") or {}
        except (ValueError, TypeError, KeyError):
            continue
        stock.hold(options.get("task_id"), "deferred")


# -- workers -------------------------------------------------------------------------------------
def _workers(app: PlatformCelery, stock: Stock, timeout: float, consumers: dict[str, int]) -> None:
    """Jobs the live workers hold; work queues with consumers that did not answer are blind."""
    names = sorted({name for reply in app.control.ping(timeout=timeout) or [] for name in reply})
    stock.workers = tuple(names)
    if names:
        inspect = app.control.inspect(destination=names, timeout=timeout, limit=len(names))
        for kind in ("active", "reserved"):
            for worker, requests in (getattr(inspect, kind)() or {}).items():
                for request in requests or ():
                    stock.hold(request.get("id"), f"worker:{worker}:{kind}")
        for worker, entries in (inspect.scheduled() or {}).items():
            for entry in entries or ():
                stock.hold((entry.get("request") or {}).get("id"), f"worker:{worker}:scheduled")
        answering = _answering_consumers(app, inspect.active_queues() or {})
    else:
        answering = dict.fromkeys(QUEUES, 0)
    for family, count in consumers.items():
        if count > answering.get(family, 0):
            stock.blind.setdefault(
                family,
                f"{count} consumer(s) on the queue but {answering.get(family, 0)} worker(s) "
                "answered: a worker that does not answer may hold its jobs",
            )


def _answering_consumers(app: PlatformCelery, replies: dict[str, Any]) -> dict[str, int]:
    counts = dict.fromkeys(QUEUES, 0)
    for queues in replies.values():
        for info in queues or ():
            family = app.topology.family_of(str(info.get("name", "")))
            if family is not None:
                counts[family] += 1
    return counts
