"""The direct path (``delay()``/``apply_async``) never loses a job silently nor hangs: a broker
that refuses the connection, or accepts it and then says nothing, gives BrokerUnavailable in
bounded time; a publish RabbitMQ does not confirm gives PublishNotConfirmed. The relay, on
the same silent broker, fails its round in bounded time and keeps the job pending."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Platform, make_platform
from kombu import Queue

from tasks_platform import create_app
from tasks_platform.errors import BrokerUnavailable, PublishNotConfirmed
from tasks_platform.history.migrations import upgrade
from tasks_platform.outbox import is_pending
from tasks_platform.outbox.relay import PublishFailed, Relay
from tasks_platform.outbox.submit import sessions_for
from tasks_platform.settings import Settings

#: a publish must fail well within this (it takes ~2-5 s; generous for a loaded CI box)
BOUND = 30.0
SCHEMES = {"redis": "redis://127.0.0.1:{port}/1",
           "rabbitmq": "amqp://guest:guest@127.0.0.1:{port}//"}  # fmt: skip


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose connections are accepted (by the kernel) and never answered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # never accept(): the handshake completes, nothing is ever said
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.fixture
def refused_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()  # nothing listens there now
    return port


def settings_for(broker: str, port: int, tmp_path: Path) -> Settings:
    return Settings(broker_url=SCHEMES[broker].format(port=port), data_dir=tmp_path / "data",
                    queue_prefix="direct-", broker_socket_timeout=0.5)  # fmt: skip


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
@pytest.mark.parametrize("peer", ["silent", "refused"])
def test_delay_on_an_unavailable_broker_raises_broker_unavailable_in_bounded_time(
    broker: str, peer: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port = request.getfixturevalue(f"{peer}_port")
    app = create_app(settings_for(broker, port, tmp_path), set_as_current=False)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailable) as failed:
            app.tasks["demo.work"].delay(label="lost?")
    finally:
        app.close()
    assert time.monotonic() - started < BOUND
    assert not isinstance(failed.value, PublishNotConfirmed)
    assert "nothing was queued" in str(failed.value)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_relay_on_a_silent_broker_fails_its_round_in_bounded_time_and_keeps_the_job(
    broker: str, silent_port: int, tmp_path: Path
) -> None:
    settings = settings_for(broker, silent_port, tmp_path)  # SQLite history: the embedded one
    upgrade(settings)
    app = create_app(settings, set_as_current=False)
    relay = Relay(app)
    try:
        with sessions_for(app).begin() as session:
            job = app.tasks["demo.work"].apply_in(session, kwargs={"label": "kept"})
        started = time.monotonic()
        with pytest.raises(PublishFailed):
            relay.publish_once()
        assert time.monotonic() - started < BOUND
        with sessions_for(app)() as session:
            assert is_pending(session, job.id)
    finally:
        relay.close()
        app.close()


def test_publish_rabbitmq_does_not_confirm_raises_publish_not_confirmed(tmp_path: Path) -> None:
    with make_platform("rabbitmq", tmp_path) as platform:  # confirms (and nacks) are RabbitMQ's
        publish_nacked(platform)


def publish_nacked(platform: Platform) -> None:
    app = platform.app
    default = app.topology.queue_name("default")
    # a second queue bound to the work exchange that rejects every publish: RabbitMQ nacks a
    # publish that one of its queues rejects (jobs go through the default exchange unless
    # told otherwise, so this one names the work exchange)
    full = Queue(f"{default}.full", exchange=app.topology.work_exchange, routing_key=default,
                 queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
                 auto_delete=True)  # fmt: skip
    with app.connection_for_write() as connection:
        full.bind(connection.default_channel).declare()
        try:
            with pytest.raises(PublishNotConfirmed) as refused:
                platform.task("demo.work").apply_async(
                    kwargs={"label": "nacked"}, exchange=app.topology.work_exchange.name,
                    routing_key=default,
                )  # fmt: skip
        finally:
            full.bind(connection.default_channel).delete()
    assert "did not confirm" in str(refused.value)
