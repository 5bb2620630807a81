"""The platform's Redis transport, on a real Redis."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery.worker import state as worker_state
from conftest import REDIS_URL, require_service
from kombu import Connection, Exchange, Queue
from kombu.utils.encoding import bytes_to_str

from tasks_platform.redis_transport import ACK_DELAY, Channel, Transport
from tasks_platform.topology import REDIS_PRIORITY_STEPS


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


def _batch_queue(prefix: str) -> Queue:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name, "direct"), routing_key=name, max_priority=9)


def _platform_connection() -> Connection:
    """A connection with the platform's Redis transport options (its priority steps)."""
    options = {"priority_steps": list(REDIS_PRIORITY_STEPS), "queue_order_strategy": "priority"}
    return Connection(REDIS_URL, transport=Transport, transport_options=options)


def _forget(client: redis.Redis, queue: Queue) -> None:
    left = client.keys(f"*{queue.name}*")
    if left:
        client.delete(*left)


def _publish(connection: Connection, queue: Queue, numbers: list[int], priority: int = 0) -> None:
    producer = connection.Producer(connection.default_channel)
    for n in numbers:
        producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.routing_key,
                         serializer="json", priority=priority)  # fmt: skip


def _on_the_books(client: redis.Redis, channel: Any, queue: Queue, got: list[Any]) -> list[int]:
    """The numbers of the jobs of ``queue`` in the unacknowledged hash (other tests share it),
    checking that every one of them was delivered (in ``got``)."""
    tags = {message.delivery_tag: message.payload["n"] for message in got}
    waiting = client.lrange(queue.name, 0, -1)
    waiting_tags = {json.loads(m)["properties"]["delivery_tag"] for m in waiting if b"body" in m}
    recorded = [bytes_to_str(tag) for tag in client.hkeys(channel.qos.unacked_key)]
    assert not waiting_tags & set(recorded)
    return sorted(tags[tag] for tag in recorded if tag in tags)


def _consume(
    connection: Connection, queue: Queue, prefetch: int, count: int, *, ack: bool = False
) -> list[Any]:
    """``count`` messages, acknowledged as they come or not at all."""
    got: list[Any] = []

    def take(body: Any, message: Any) -> None:
        got.append(message)
        if ack:
            message.ack()

    with connection.Consumer(queue, callbacks=[take], prefetch_count=prefetch):
        while len(got) < count:
            connection.drain_events(timeout=5)
    return got


def test_a_consumer_allowed_several_jobs_takes_a_batch_per_round_trip_all_recorded() -> None:
    require_service("redis", REDIS_URL)
    queue = _batch_queue("fetch")
    client = redis.Redis.from_url(REDIS_URL)
    with _platform_connection() as connection:
        try:
            queue(connection.default_channel).declare()
            _publish(connection, queue, list(range(12)))
            got: list[Any] = []
            channel = connection.default_channel
            with connection.Consumer(queue, callbacks=[lambda body, m: got.append(m)],
                                     prefetch_count=5):  # fmt: skip
                connection.drain_events(timeout=5)  # one BRPOP: its message and four more
                assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4]
                assert client.llen(queue.name) == 7
                # every one of them is on the books before any ran, as kombu records one
                records = client.hgetall(channel.qos.unacked_key)
                for message in got:
                    raw, exchange, routing_key = json.loads(records[message.delivery_tag.encode()])
                    assert raw == message._raw
                    assert (exchange, routing_key) == (queue.name, queue.name)
                    assert client.zscore(channel.qos.unacked_index_key, message.delivery_tag)
                assert not channel.qos.can_consume()
                for message in got:
                    message.ack()
                assert _on_the_books(client, channel, queue, got) == []
                connection.drain_events(timeout=5)
                assert [m.payload["n"] for m in got[5:]] == [5, 6, 7, 8, 9]
                for message in got[5:]:
                    message.ack()
        finally:
            _forget(client, queue)
            client.close()


def test_a_batch_takes_jobs_in_the_order_one_by_one_consumption_would() -> None:
    require_service("redis", REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL)
    orders = []
    for prefetch in (1, 20):  # one by one (kombu's path), then one batch
        queue = _batch_queue("order")
        with _platform_connection() as connection:
            try:
                queue(connection.default_channel).declare()
                _publish(connection, queue, [0, 1, 2], priority=1)
                _publish(connection, queue, [3, 4], priority=9)
                _publish(connection, queue, [5, 6, 7], priority=5)
                got = _consume(connection, queue, prefetch, 8, ack=True)
                orders.append([m.payload["n"] for m in got])
            finally:
                _forget(client, queue)
    client.close()
    assert orders[0] == orders[1]
    assert sorted(orders[0]) == list(range(8))


def test_an_item_that_is_not_a_message_ends_the_batch_and_stays_where_it_was() -> None:
    require_service("redis", REDIS_URL)
    queue = _batch_queue("garbage")
    client = redis.Redis.from_url(REDIS_URL)
    with _platform_connection() as connection:
        try:
            channel = connection.default_channel
            queue(channel).declare()
            _publish(connection, queue, [0, 1])
            client.lpush(queue.name, b"not a message")
            client.lpush(queue.name, json.dumps({"properties": {"delivery_tag": 7}}))
            _publish(connection, queue, [2])
            got = _consume(connection, queue, 10, 2)
            assert [m.payload["n"] for m in got] == [0, 1]
            assert client.lrange(queue.name, 0, -1)[1:] == [
                json.dumps({"properties": {"delivery_tag": 7}}).encode(), b"not a message"
            ]  # fmt: skip
            assert _on_the_books(client, channel, queue, got) == [0, 1]
            for message in got:
                message.ack()
        finally:
            _forget(client, queue)
            client.close()


def test_jobs_a_batch_took_that_no_consumer_got_go_back_to_the_front_of_their_queue() -> None:
    require_service("redis", REDIS_URL)
    queue = _batch_queue("handback")
    client = redis.Redis.from_url(REDIS_URL)
    got: list[Any] = []

    def take(body: Any, message: Any) -> None:
        got.append(message)
        if len(got) == 2:
            raise RuntimeError("the consumer failed")

    with _platform_connection() as connection:
        try:
            channel = connection.default_channel
            queue(channel).declare()
            _publish(connection, queue, list(range(6)))
            with (
                connection.Consumer(queue, callbacks=[take], prefetch_count=5),
                pytest.raises(RuntimeError, match="the consumer failed"),
            ):
                connection.drain_events(timeout=5)
            assert [m.payload["n"] for m in got] == [0, 1]
            assert _on_the_books(client, channel, queue, got) == [0, 1]  # not the rest
            left = [json.loads(item)["body"] for item in client.lrange(queue.name, 0, -1)]
            assert [json.loads(base64.b64decode(body))["n"] for body in reversed(left)] == [
                2, 3, 4, 5
            ]  # fmt: skip
            assert not channel.qos.fetched
            for message in got:
                message.ack()
        finally:
            _forget(client, queue)
            client.close()


def test_a_worker_told_to_stop_gets_no_more_of_a_batch_and_the_rest_go_back() -> None:
    require_service("redis", REDIS_URL)
    queue = _batch_queue("stopping")
    client = redis.Redis.from_url(REDIS_URL)
    got: list[Any] = []

    def take(body: Any, message: Any) -> None:
        got.append(message)
        worker_state.should_stop = 0  # a warm shutdown (exit code 0) while a job runs

    with _platform_connection() as connection:
        try:
            channel = connection.default_channel
            queue(channel).declare()
            _publish(connection, queue, list(range(4)))
            with connection.Consumer(queue, callbacks=[take], prefetch_count=8):
                connection.drain_events(timeout=5)
            assert [m.payload["n"] for m in got] == [0]
            assert _on_the_books(client, channel, queue, got) == [0]
            assert client.llen(queue.name) == 3
            got[0].ack()
        finally:
            worker_state.should_stop = None
            _forget(client, queue)
            client.close()


def test_a_batch_that_runs_long_renews_the_visibility_of_the_jobs_still_waiting() -> None:
    require_service("redis", REDIS_URL)
    queue = _batch_queue("renew")
    client = redis.Redis.from_url(REDIS_URL)
    began: list[float] = []
    scores: list[float] = []

    def take(body: Any, message: Any) -> None:  # a job of 0.15 s, run as it is delivered
        began.append(time.time())
        scores.append(client.zscore(channel.qos.unacked_index_key, message.delivery_tag) or 0.0)
        time.sleep(0.15)
        message.ack()

    options = {"priority_steps": list(REDIS_PRIORITY_STEPS), "queue_order_strategy": "priority",
               "visibility_timeout": 0.4}  # fmt: skip
    with Connection(REDIS_URL, transport=Transport, transport_options=options) as connection:
        try:
            channel = connection.default_channel
            queue(channel).declare()
            _publish(connection, queue, list(range(5)))
            with connection.Consumer(queue, callbacks=[take], prefetch_count=8):
                connection.drain_events(timeout=5)  # one batch of five, 0.75 s: renewed twice
            assert len(began) == 5
            assert scores[0] <= began[0]  # as fetched
            assert scores[-1] >= began[1]  # the last one's lease was renewed while it waited
        finally:
            _forget(client, queue)
            client.close()
