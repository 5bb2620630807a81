"""Dramatiq, a peer: a no-op actor on Redis or RabbitMQ with Dramatiq's defaults.

``dramatiq dramatiq_app`` reads the broker and queue from ``BENCH_BROKER_URL`` and
``BENCH_QUEUE``; the producer builds the same broker with :func:`make_broker`.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq


def make_broker(broker_url: str, queue: str) -> tuple[Any, Any]:
    """The broker and the no-op actor on ``queue``."""
    if broker_url.startswith("redis"):
        from dramatiq.brokers.redis import RedisBroker  # noqa: PLC0415

        broker: Any = RedisBroker(url=broker_url)
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker  # noqa: PLC0415

        if broker_url.endswith("//"):  # kombu's spelling of the vhost "/"; pika's is %2F
            broker_url = broker_url[:-1] + "%2F"
        broker = RabbitmqBroker(url=broker_url)
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name=queue, actor_name="noop", broker=broker)
    def noop() -> None:
        """Does nothing."""

    return broker, noop


if "BENCH_BROKER_URL" in os.environ:  # in the worker
    broker, noop = make_broker(os.environ["BENCH_BROKER_URL"], os.environ["BENCH_QUEUE"])
