"""The bulk submit API (``submit_many`` / ``task.delay_many``) on every broker.

Jobs queued in bulk run, their ids come back in the order of the payloads, their messages
carry the platform's headers (tenant, priority, redacted repr), the history has them; one
invalid payload queues nothing. Wall time: about 30 s under -n 2.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy
from conftest import Platform, make_platform, postgres_schema, wait_for
from sqlalchemy.orm import Session

from tasks_platform import bulk, create_app, submit_many
from tasks_platform.errors import BrokerUnavailable, InvalidPayload
from tasks_platform.history import recorder
from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import Base, Job
from tasks_platform.history.recorder import prepare_embedded_database
from tasks_platform.jobs.declaration import PRIORITY_HEADER, TENANT_HEADER, PlatformTask
from tasks_platform.settings import Settings
from tasks_platform.stats.broker import queue_depths

JOBS = 24


@contextmanager
def bulk_platform(broker: str, tmp_path: Path) -> Iterator[Platform]:
    """A platform with its history in PostgreSQL (server brokers) or SQLite (embedded)."""
    if broker == "embedded":
        with make_platform(broker, tmp_path) as platform:
            prepare_embedded_database(platform.settings)  # SQLite, through its migrations
            platform.history = create_history_engine(platform.settings)
            try:
                yield platform
            finally:
                platform.history.dispose()
        return
    with postgres_schema() as url, make_platform(broker, tmp_path, database_url=url) as platform:
        platform.history = create_history_engine(platform.settings)
        Base.metadata.create_all(platform.history)
        try:
            yield platform
        finally:
            platform.history.dispose()


def waiting(platform: Platform) -> int:
    with platform.app.connection_for_read() as connection:
        depths = queue_depths(connection, platform.app.topology)
    return sum(d.messages for d in depths if d.queue == "default")


def rows(platform: Platform, ids: list[str]) -> dict[str, Job]:
    with Session(platform.history) as session:
        found = session.scalars(sqlalchemy.select(Job).where(Job.id.in_(ids))).all()
        return {job.id: job for job in found}


def take_all(platform: Platform, count: int) -> list[Any]:
    """Take (and acknowledge) ``count`` messages off the default queue, no worker involved."""
    queue = platform.app.amqp.queues[platform.app.topology.queue_name("default")]
    taken: list[Any] = []
    with platform.app.connection_for_read() as connection:
        bound = queue(connection.default_channel)

        def more() -> bool:
            message = bound.get(no_ack=False, accept=["json"])
            if message is not None:
                message.ack()
                taken.append(message)
            return len(taken) >= count

        wait_for(more, 30, what=f"{count} bulk messages in the queue", interval=0.01)
    return taken


@pytest.mark.parametrize("broker", ["embedded", "redis", "rabbitmq"])
def test_bulk_submitted_jobs_run_with_ids_in_order_headers_and_history(
    broker: str, tmp_path: Path
) -> None:
    with bulk_platform(broker, tmp_path) as platform:
        # the messages themselves: tenant and priority headers, secrets kept out of the repr
        secret = [{"account": f"acct-{n}", "password": "hunter2", "api_key": "sk-live-x"}
                  for n in range(2)]  # fmt: skip
        sync_ids = platform.task("demo.sync_account").delay_many(
            secret, tenant="acme", priority="high"
        )
        messages = take_all(platform, 2)
        assert sorted(m.headers["id"] for m in messages) == sorted(sync_ids)
        for message in messages:
            assert message.headers[TENANT_HEADER] == "acme"
            assert message.headers[PRIORITY_HEADER] == "high"
            assert "hunter2" not in message.headers["kwargsrepr"]
            assert "sk-live-x" not in message.headers["kwargsrepr"]
            assert message.payload[1]["password"] == "hunter2"  # the job itself gets it

        runs = platform.runs()
        payloads = [{"label": f"b{n}", "record_to": str(runs.path)} for n in range(JOBS)]
        ids = submit_many("demo.work", payloads, tenant="acme", priority="high",
                          batch_size=10, app=platform.app)  # fmt: skip
        assert len(ids) == len(set(ids)) == JOBS
        assert waiting(platform) == JOBS
        recorder.close_all()  # the producer's `queued` transitions, written now

        platform.worker(concurrency=2, loglevel="WARNING")
        wait_for(lambda: len(runs.dones()) >= JOBS, 90, what=f"{JOBS} bulk jobs done")
        assert sorted(r[0] for r in runs.dones()) == sorted(p["label"] for p in payloads)

        def recorded() -> dict[str, Job] | None:
            found = rows(platform, ids)
            done = [job for job in found.values() if job.state == "succeeded"]
            return found if len(done) == JOBS else None

        found = wait_for(recorded, 60, what="every bulk job succeeded in the history")
        for number, job_id in enumerate(ids):  # ids in the order of the payloads
            job = found[job_id]
            assert job.kwargs["label"] == f"b{number}"
            assert (job.name, job.queue, job.tenant, job.priority) == (
                "demo.work", "default", "acme", "high"
            )  # fmt: skip
            assert job.queued_at is not None


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_one_invalid_payload_queues_nothing_and_names_its_index(
    broker: str, tmp_path: Path
) -> None:
    with make_platform(broker, tmp_path) as platform:
        good = {"label": "fine"}
        with pytest.raises(InvalidPayload, match=r"payloads\[2\]: .*duration"):
            submit_many("demo.work", [good, good, {"duration": -1}, good], app=platform.app)
        with pytest.raises(InvalidPayload, match=r"payloads\[1\]: .*mapping"):
            platform.task("demo.work").delay_many([good, ["not", "a", "mapping"]])
        with pytest.raises(InvalidPayload, match="idempotency_keys has 1 entries for 2"):
            platform.task("demo.work").delay_many([good, good], idempotency_keys=["k"])
        with pytest.raises(InvalidPayload, match="tenant"):
            platform.task("demo.work").delay_many([good], tenant="no spaces")
        assert waiting(platform) == 0
        recorder.close_all()
        prepare_embedded_database(platform.settings)  # the (SQLite) history exists, and is empty
        engine = create_history_engine(platform.settings)
        try:
            with engine.connect() as connection:
                queued = connection.scalar(sqlalchemy.text("SELECT count(*) FROM jobs"))
        finally:
            engine.dispose()
        assert queued == 0


def test_idempotency_keys_in_bulk_queue_once_per_key(tmp_path: Path) -> None:
    with make_platform("redis", tmp_path) as platform:
        payloads = [{"label": f"k{n}"} for n in range(4)]
        ids = platform.task("demo.work").delay_many(
            payloads, idempotency_keys=["order-1", None, "order-1", "order-2"]
        )
        assert ids[0] == ids[2]  # the repeat names the first job
        assert len(set(ids)) == 3
        assert waiting(platform) == 3
        again = platform.task("demo.work").delay_many(payloads[:1], idempotency_keys=["order-2"])
        assert again == [ids[3]]
        assert waiting(platform) == 3


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"], ids=["redis", "rabbitmq"]
)
def test_an_unreachable_broker_is_a_clear_error(url: str, tmp_path: Path) -> None:
    settings = Settings(broker_url=url, data_dir=tmp_path, queue_prefix="gone-",
                        history_enabled=False)  # fmt: skip
    app = create_app(settings, set_as_current=False)
    try:
        with pytest.raises(BrokerUnavailable, match="the 0 jobs of the batches before it"):
            submit_many("demo.noop", [{}] * 3, app=app)
    finally:
        app.close()


def secret_batch(platform: Platform) -> Any:
    """A batch of two ``demo.sync_account`` jobs with secrets in their payloads, high priority,
    a tenant and a countdown."""
    task = platform.task("demo.sync_account")
    assert isinstance(task, PlatformTask)
    payloads = [{"account": f"a-{n}", "password": "hunter2", "api_key": "sk"} for n in (0, 1)]
    items = bulk._validate(task, payloads, None)
    return bulk._Batch(task, items, {PRIORITY_HEADER: "high", TENANT_HEADER: "acme"},
                       task._broker_priority("high"), countdown=5)  # fmt: skip


def test_on_redis_a_bulk_message_is_the_envelope_kombu_writes(tmp_path: Path) -> None:
    """On Redis a batch goes out as one LPUSH of envelopes the platform writes itself: each is
    what kombu's channel would have pushed (delivery tag aside), and the list keeps the order."""
    with make_platform("redis", tmp_path, history_enabled=False) as platform:
        batch = secret_batch(platform)
        batch.send()  # the platform's envelopes
        with platform.app.producer_or_acquire() as producer, producer.batch(max_size=3):
            batch._publish_all(producer)  # kombu's, for the same jobs

        client = redis.Redis.from_url(platform.settings.broker_url)
        try:
            (key,) = [k for k in client.keys(f"{batch.queue.name}*") if client.type(k) == b"list"]
            pushed = [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]
        finally:
            client.close()
        ours, kombus = pushed[:2], pushed[2:]
        for message in ours:
            assert "'password': '[redacted]'" in message["headers"]["kwargsrepr"]
        for mine, theirs in zip(ours, kombus, strict=True):
            body = [json.loads(base64.b64decode(m.pop("body"))) for m in (mine, theirs)]
            assert body[0] == body[1]
            tags = [m["properties"].pop("delivery_tag") for m in (mine, theirs)]
            assert tags[0] != tags[1]
            for m in (mine, theirs):  # the eta is computed at each publish
                assert m["headers"].pop("eta") is not None
            assert mine == theirs
        taken = take_all(platform, 4)  # in the order pushed
        assert [m.payload[1]["account"] for m in taken] == ["a-0", "a-1", "a-0", "a-1"]


def test_on_rabbitmq_a_bulk_message_is_the_one_kombu_publishes(tmp_path: Path) -> None:
    """On RabbitMQ a batch's frames are written without kombu's producer: each message is what
    kombu would have published (body, headers, properties), and the queue keeps the order."""
    with make_platform("rabbitmq", tmp_path, history_enabled=False) as platform:
        batch = secret_batch(platform)
        batch.send()  # the platform's frames, confirmed
        with platform.app.producer_or_acquire() as producer:
            batch._publish_all(producer)  # kombu's, for the same jobs

        taken = take_all(platform, 4)
        assert [m.payload[1]["account"] for m in taken] == ["a-0", "a-1", "a-0", "a-1"]
        ours, kombus = taken[:2], taken[2:]
        for message in ours:
            assert "'password': '[redacted]'" in message.headers["kwargsrepr"]
        for mine, theirs in zip(ours, kombus, strict=True):
            assert mine.body == theirs.body
            assert (mine.content_type, mine.content_encoding) == ("application/json", "utf-8")
            assert (theirs.content_type, theirs.content_encoding) == ("application/json", "utf-8")
            headers = [dict(m.headers) for m in (mine, theirs)]
            for h in headers:  # the eta is computed at each publish
                assert h.pop("eta") is not None
            assert headers[0] == headers[1]
            properties = [{k: v for k, v in m.properties.items() if k != "application_headers"}
                          for m in (mine, theirs)]  # fmt: skip
            assert properties[0] == properties[1]
            assert properties[0]["delivery_mode"] == 2
            assert properties[0]["priority"] == batch.task._broker_priority("high")
