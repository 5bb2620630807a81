"""The platform's Redis transport, on a real Redis."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class Batching:
    """A queue on a connection with the platform's Redis transport options, and a client."""

    connection: Connection
    channel: Any
    queue: Queue
    client: redis.Redis

    def publish(self, numbers: list[int], priority: int = 0) -> None:
        producer = self.connection.Producer(self.channel)
        for n in numbers:
            producer.publish({"n": n}, exchange=self.queue.exchange, serializer="json",
                             routing_key=self.queue.routing_key, priority=priority)  # fmt: skip

    def consume(self, prefetch: int, count: int, *, ack: bool = False) -> list[Any]:
        """``count`` messages, acknowledged as they come or not at all."""
        got: list[Any] = []

        def take(body: Any, message: Any) -> None:
            got.append(message)
            if ack:
                message.ack()

        with self.connection.Consumer(self.queue, callbacks=[take], prefetch_count=prefetch):
            while len(got) < count:
                self.connection.drain_events(timeout=5)
        return got

    def on_the_books(self, got: list[Any]) -> list[int]:
        """The numbers of this queue's jobs in the unacknowledged hash (other tests share it),
        checking that each of them was delivered (is in ``got``) and none is still waiting."""
        numbers = {message.delivery_tag: message.payload["n"] for message in got}
        waiting = self.client.lrange(self.queue.name, 0, -1)
        waiting_tags = {
            json.loads(m)["properties"]["delivery_tag"] for m in waiting if b"body" in m
        }
        recorded = [bytes_to_str(tag) for tag in self.client.hkeys(self.channel.qos.unacked_key)]
        assert not waiting_tags & set(recorded)
        return sorted(numbers[tag] for tag in recorded if tag in numbers)

    def waiting(self) -> list[int]:
        """The numbers of the jobs in the queue, the next one first."""
        items = self.client.lrange(self.queue.name, 0, -1)
        bodies = [json.loads(item)["body"] for item in reversed(items)]
        return [json.loads(base64.b64decode(body))["n"] for body in bodies]


@contextmanager
def batching(prefix: str, **options: Any) -> Iterator[Batching]:
    require_service("redis", REDIS_URL)
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "direct"), routing_key=name, max_priority=9)
    options = {"priority_steps": list(REDIS_PRIORITY_STEPS), "queue_order_strategy": "priority",
               **options}  # fmt: skip
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with Connection(REDIS_URL, transport=Transport, transport_options=options) as connection:
            channel = connection.default_channel
            queue(channel).declare()
            yield Batching(connection, channel, queue, client)
    finally:
        left = client.keys(f"*{name}*")
        if left:
            client.delete(*left)
        client.close()


def test_a_consumer_allowed_several_jobs_takes_a_batch_per_round_trip_all_recorded() -> None:
    with batching("fetch") as b:
        b.publish(list(range(12)))
        got: list[Any] = []
        with b.connection.Consumer(b.queue, callbacks=[lambda body, m: got.append(m)],
                                   prefetch_count=5):  # fmt: skip
            b.connection.drain_events(timeout=5)  # one BRPOP: its message and four more
            assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4]
            assert b.client.llen(b.queue.name) == 7
            # every one of them is on the books before any ran, as kombu records one
            records = b.client.hgetall(b.channel.qos.unacked_key)
            for message in got:
                raw, exchange, routing_key = json.loads(records[message.delivery_tag.encode()])
                assert raw == message._raw
                assert (exchange, routing_key) == (b.queue.name, b.queue.name)
                assert b.client.zscore(b.channel.qos.unacked_index_key, message.delivery_tag)
            assert not b.channel.qos.can_consume()
            for message in got:
                message.ack()
            assert b.on_the_books(got) == []
            b.connection.drain_events(timeout=5)
            assert [m.payload["n"] for m in got[5:]] == [5, 6, 7, 8, 9]
            for message in got[5:]:
                message.ack()


def test_a_batch_takes_jobs_in_the_order_one_by_one_consumption_would() -> None:
    orders = []
    for prefetch in (1, 20):  # one by one (kombu's path), then one batch
        with batching("order") as b:
            b.publish([0, 1, 2], priority=1)
            b.publish([3, 4], priority=9)
            b.publish([5, 6, 7], priority=5)
            orders.append([m.payload["n"] for m in b.consume(prefetch, 8, ack=True)])
    assert orders[0] == orders[1]
    assert sorted(orders[0]) == list(range(8))


def test_an_item_that_is_not_a_message_ends_the_batch_and_stays_where_it_was() -> None:
    with batching("garbage") as b:
        b.publish([0, 1])
        b.client.lpush(b.queue.name, b"not a message")
        b.client.lpush(b.queue.name, json.dumps({"properties": {"delivery_tag": 7}}))
        b.publish([2])
        got = b.consume(10, 2)
        assert [m.payload["n"] for m in got] == [0, 1]
        assert b.client.lrange(b.queue.name, 0, -1)[1:] == [
            json.dumps({"properties": {"delivery_tag": 7}}).encode(), b"not a message"
        ]  # fmt: skip
        assert b.on_the_books(got) == [0, 1]
        for message in got:
            message.ack()


def test_jobs_a_batch_took_that_no_consumer_got_go_back_to_the_front_of_their_queue() -> None:
    got: list[Any] = []

    def take(body: Any, message: Any) -> None:
        got.append(message)
        if len(got) == 2:
            raise RuntimeError("the consumer failed")

    with batching("handback") as b:
        b.publish(list(range(6)))
        with (
            b.connection.Consumer(b.queue, callbacks=[take], prefetch_count=5),
            pytest.raises(RuntimeError, match="the consumer failed"),
        ):
            b.connection.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [0, 1]
        assert b.on_the_books(got) == [0, 1]  # not the rest
        assert b.waiting() == [2, 3, 4, 5]
        assert not b.channel.qos.fetched
        for message in got:
            message.ack()


def test_a_worker_told_to_stop_gets_no_more_of_a_batch_and_the_rest_go_back() -> None:
    got: list[Any] = []

    def take(body: Any, message: Any) -> None:
        got.append(message)
        worker_state.should_stop = 0  # a warm shutdown (exit code 0) while a job runs

    try:
        with batching("stopping") as b:
            b.publish(list(range(4)))
            with b.connection.Consumer(b.queue, callbacks=[take], prefetch_count=8):
                b.connection.drain_events(timeout=5)
            assert [m.payload["n"] for m in got] == [0]
            assert b.on_the_books(got) == [0]
            assert b.waiting() == [1, 2, 3]
            got[0].ack()
    finally:
        worker_state.should_stop = None


def test_a_batch_that_runs_long_renews_the_visibility_of_the_jobs_still_waiting() -> None:
    began: list[float] = []
    scores: list[float] = []

    def take(body: Any, message: Any) -> None:  # a job of 0.15 s, run as it is delivered
        began.append(time.time())
        scores.append(b.client.zscore(b.channel.qos.unacked_index_key, message.delivery_tag) or 0)
        time.sleep(0.15)
        message.ack()

    with batching("renew", visibility_timeout=0.4) as b:
        b.publish(list(range(5)))
        with b.connection.Consumer(b.queue, callbacks=[take], prefetch_count=8):
            b.connection.drain_events(timeout=5)  # one batch of five, 0.75 s: renewed on the way
        assert len(began) == 5
        assert scores[0] <= began[0]  # as fetched
        assert scores[-1] >= began[1]  # the last one's lease was renewed while it waited
