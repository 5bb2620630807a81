"""Exchanges, queues and priorities: the one module that knows their names.

Work goes through one direct exchange ``tasks`` into one durable queue per job family.
Hopeless jobs go through the direct exchange ``tasks.dead`` into ``<queue>.dead``. Every name
carries the configured prefix, so that several deployments (or test runs) can share a broker.

Priorities have four names, mapped per broker:

============  ==========================  ============================  ===============
name          RabbitMQ (x-max-priority 3)  Redis (priority steps, 0 first)  embedded files
============  ==========================  ============================  ===============
critical      3                           0                             FIFO (ignored)
high          2                           3                             FIFO (ignored)
normal        1                           6                             FIFO (ignored)
low           0                           9                             FIFO (ignored)
============  ==========================  ============================  ===============
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from kombu.entity import Exchange, Queue

from tasks_platform.settings import BrokerKind, Settings

#: The job families; each has its own work queue and dead-letter queue.
QUEUES: tuple[str, ...] = ("ai", "email", "reports", "webhooks", "payments", "default")
DEFAULT_QUEUE = "default"
DEAD_SUFFIX = ".dead"
RABBITMQ_MAX_PRIORITY = 3
REDIS_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)


class Priority(StrEnum):
    """How urgent a job is; ``normal`` unless said otherwise."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @classmethod
    def parse(cls, value: str | Priority) -> Priority:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown priority {value!r}; expected one of: {names}") from None


_RABBITMQ = {Priority.CRITICAL: 3, Priority.HIGH: 2, Priority.NORMAL: 1, Priority.LOW: 0}
_REDIS = {Priority.CRITICAL: 0, Priority.HIGH: 3, Priority.NORMAL: 6, Priority.LOW: 9}


class Topology:
    """Names and declarations of the exchanges and queues for one settings object."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.queue_prefix
        self.broker_kind = settings.broker_kind
        self.work_exchange = Exchange(f"{self.prefix}tasks", type="direct", durable=True)
        self.dead_exchange = Exchange(f"{self.prefix}tasks.dead", type="direct", durable=True)

    # -- names -------------------------------------------------------------------------------
    def queue_name(self, family: str) -> str:
        self.check_family(family)
        return f"{self.prefix}{family}"

    def family_of(self, queue_name: str) -> str | None:
        """The family of a full work-queue name, or None if it is not one of ours."""
        if not queue_name.startswith(self.prefix):
            return None
        family = queue_name[len(self.prefix) :]
        return family if family in QUEUES else None

    @staticmethod
    def check_family(family: str) -> None:
        if family not in QUEUES:
            raise ValueError(f"unknown queue {family!r}; declared queues: {', '.join(QUEUES)}")

    # -- declarations ------------------------------------------------------------------------
    def work_queue(self, family: str) -> Queue:
        name = self.queue_name(family)
        arguments: dict[str, object] = {}
        if self.broker_kind is BrokerKind.RABBITMQ:
            # the broker itself dead-letters whatever is rejected without requeue or expires
            arguments = {
                "x-max-priority": RABBITMQ_MAX_PRIORITY,
                "x-dead-letter-exchange": self.dead_exchange.name,
                "x-dead-letter-routing-key": f"{name}{DEAD_SUFFIX}",
            }
        return Queue(
            name,
            exchange=self.work_exchange,
            routing_key=name,
            durable=True,
            queue_arguments=arguments or None,
        )

    def dead_queue(self, family: str) -> Queue:
        name = f"{self.queue_name(family)}{DEAD_SUFFIX}"
        return Queue(name, exchange=self.dead_exchange, routing_key=name, durable=True)

    def work_queues(self) -> list[Queue]:
        return [self.work_queue(family) for family in QUEUES]

    def dead_queues(self) -> list[Queue]:
        return [self.dead_queue(family) for family in QUEUES]

    def declare_all(self, channel: Any) -> None:
        """Declare every exchange, work queue and dead-letter queue on ``channel``."""
        for queue in (*self.work_queues(), *self.dead_queues()):
            queue(channel).declare()

    def delete_all(self, channel: Any) -> None:
        """Delete every queue and exchange of this prefix (demo and test clean-up)."""
        if not self.prefix:
            raise ValueError("refusing to delete the queues of the unprefixed deployment")
        if self.broker_kind is BrokerKind.REDIS:
            # kombu's Redis queue_delete keeps the lists it holds and its binding keys
            client = channel.client
            for pattern in (f"{self.prefix}*", f"_kombu.binding*.{self.prefix}*"):
                for key in client.scan_iter(match=pattern, count=500):
                    client.delete(key)
            return
        for queue in (*self.work_queues(), *self.dead_queues()):
            queue(channel).delete()
        for exchange in (self.work_exchange, self.dead_exchange):
            exchange(channel).delete()
        if self.broker_kind is BrokerKind.RABBITMQ:
            for name in (f"{self.prefix}celeryev", f"{self.prefix}celery.pidbox",
                         f"reply.{self.prefix}celery.pidbox"):  # fmt: skip
                Exchange(name)(channel).delete()

    # -- priorities --------------------------------------------------------------------------
    def priority_value(self, priority: Priority) -> int | None:
        """The broker's number for a priority name (None where the broker has none)."""
        if self.broker_kind is BrokerKind.RABBITMQ:
            return _RABBITMQ[priority]
        if self.broker_kind is BrokerKind.REDIS:
            return _REDIS[priority]
        return None

    def priority_name(self, value: int | None) -> Priority:
        """The priority name for a broker number (``normal`` when unknown or absent)."""
        table = {
            BrokerKind.RABBITMQ: _RABBITMQ,
            BrokerKind.REDIS: _REDIS,
        }.get(self.broker_kind)
        if table is None or value is None:
            return Priority.NORMAL
        for name, number in table.items():
            if number == value:
                return name
        return Priority.NORMAL
