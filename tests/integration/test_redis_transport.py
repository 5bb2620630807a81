"""The platform's Redis transport and a Redis worker's job events, on a real Redis."""

from __future__ import annotations

import uuid
from pathlib import Path

from conftest import REDIS_URL, make_platform, require_service, wait_for
from event_tap import EventTap
from kombu import Connection, Exchange, Queue

from tasks_platform.redis_transport import Channel, Transport


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


def test_every_job_event_of_a_redis_worker_reaches_monitors(tmp_path: Path) -> None:
    with make_platform("redis", tmp_path, event_flush_interval=0.2) as platform:
        assert platform.app.conf.broker_transport == "tasks_platform.redis_transport:Transport"
        with (
            EventTap(platform.app, "task-received") as received,
            EventTap(platform.app, "task-succeeded") as succeeded,
        ):
            platform.worker(concurrency=2)
            ids = {platform.task("demo.noop").delay().id for _ in range(60)}

            def all_seen() -> bool:
                return ids <= {e["uuid"] for e in succeeded.seen}

            wait_for(all_seen, 60, what="a task-succeeded event of every job")
            assert ids <= {e["uuid"] for e in received.seen}
        mine = [e for e in succeeded.seen if e["uuid"] in ids]
        assert len(mine) == len(ids), "an event was published twice"
        assert all(e["hostname"] == mine[0]["hostname"] for e in mine)
