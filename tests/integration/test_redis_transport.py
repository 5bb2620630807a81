"""The platform's Redis transport, on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import redis
from conftest import REDIS_URL, require_service
from kombu import Connection, Exchange, Queue

from tasks_platform.redis_transport import ACK_DELAY, Channel, Transport


def test_a_channel_sends_every_command_through_one_client_until_its_pool_changes() -> None:
    require_service("redis", REDIS_URL)
    with Connection(REDIS_URL, transport=Transport) as connection:
        channel = connection.default_channel
        assert isinstance(channel, Channel)
        first = channel._create_client()
        assert channel._create_client() is first
        with channel.conn_or_acquire() as client:
            assert client is first
        assert channel.client is not first  # the consumer's own (BRPOP) client stays apart
        channel._disconnect_pools()  # what kombu does after a connection error
        again = channel._create_client()
        assert again is not first
        assert again.connection_pool is channel.pool


def test_messages_published_and_consumed_through_the_transport_arrive_whole() -> None:
    require_service("redis", REDIS_URL)
    name = f"transport-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    with Connection(REDIS_URL, transport=Transport) as connection:
        simple = connection.SimpleQueue(queue)
        try:
            for n in range(50):
                simple.put({"n": n}, serializer="json")
            got = []
            for _ in range(50):
                message = simple.get(timeout=5)
                got.append(message.payload["n"])
                message.ack()
            assert got == list(range(50))
        finally:
            simple.queue.delete()
            simple.close()


class _Loop:
    """A worker's event loop, as far as the transport sees it: timers to call later."""

    def __init__(self) -> None:
        self.later: list[Callable[[], None]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        assert 0 < delay <= ACK_DELAY
        self.later.append(callback)


def test_a_workers_acknowledgement_leaves_with_the_next_message_or_a_moment_later() -> None:
    require_service("redis", REDIS_URL)
    name = f"acks-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    client = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL, transport=Transport) as connection:
        loop = _Loop()
        connection.transport.event_loop = loop  # as when the worker registers it
        channel = connection.default_channel
        queue(channel).declare()
        producer = connection.Producer(channel)
        try:
            for n in range(3):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key=name,
                                 serializer="json")  # fmt: skip
            unacked = channel.qos.unacked_key
            first = channel.basic_get(name)
            assert client.hexists(unacked, first.delivery_tag)
            first.ack()
            assert client.hexists(unacked, first.delivery_tag)  # not yet: it waits
            assert channel.qos.can_consume()  # but the next message may be fetched
            assert len(loop.later) == 1

            second = channel.basic_get(name)  # one round trip: its bookkeeping and the ack
            assert not client.hexists(unacked, first.delivery_tag)
            assert client.hexists(unacked, second.delivery_tag)
            second.ack()
            loop.later[0]()  # no message came within ACK_DELAY
            assert not client.hexists(unacked, second.delivery_tag)

            third = channel.basic_get(name)
            third.ack()
            channel.close()  # a warm shutdown sends what waits
            assert not client.hexists(unacked, third.delivery_tag)
        finally:
            left = client.keys(f"*{name}*")  # its list and kombu's binding
            if left:
                client.delete(*left)
            client.close()


def test_a_channel_collected_after_its_connection_was_lost_leaves_its_jobs_to_redis() -> None:
    require_service("redis", REDIS_URL)
    name = f"lost-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with Connection(REDIS_URL, transport=Transport) as connection:
            connection.transport.event_loop = _Loop()
            channel = connection.default_channel
            queue(channel).declare()
            connection.Producer(channel).publish({"n": 1}, exchange=queue.exchange,
                                                 routing_key=name, serializer="json")  # fmt: skip
            held = channel.basic_get(name)
            kombu_connection, channel.connection.client = channel.connection.client, None
            try:  # what kombu's collect() leaves after a connection error
                assert channel.qos.restore_unacked_once() is None  # no error: nothing sent
            finally:
                channel.connection.client = kombu_connection
            assert client.hexists(channel.qos.unacked_key, held.delivery_tag)  # Redis keeps it
    finally:
        left = client.keys(f"*{name}*")  # the job, handed back when the channel closed
        if left:
            client.delete(*left)
        client.close()
