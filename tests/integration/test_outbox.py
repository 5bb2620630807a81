"""The outbox on real PostgreSQL and both server brokers: a job exists iff its transaction
commits, and one committed while the broker is unreachable runs once the broker is back.
(The relays' own tests: test_outbox_relays.py; the direct path: test_outbox_direct.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import BROKER_URLS, Platform, make_platform, postgres_schema, wait_for
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from tcp_proxy import TcpProxy

from tasks_platform import create_app, submit
from tasks_platform.errors import ConfigurationError
from tasks_platform.history.migrations import upgrade
from tasks_platform.history.models import Job, OutboxMessage
from tasks_platform.outbox import is_pending
from tasks_platform.outbox.relay import Relay
from tasks_platform.outbox.submit import sessions_for

pytestmark = pytest.mark.postgres


@pytest.fixture(params=["redis", "rabbitmq"])
def outbox_platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    """A platform on each server broker whose history (and outbox) is a fresh PG schema."""
    with postgres_schema() as url, make_platform(request.param, tmp_path, database_url=url) as p:
        upgrade(p.settings)
        yield p


def work(platform: Platform, label: str) -> dict[str, Any]:
    return {"label": label, "record_to": str(platform.runs().path)}


@contextmanager
def relaying(app: Any) -> Iterator[Relay]:
    stop = threading.Event()
    relay = Relay(app)
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        thread.join(timeout=30)


@contextmanager
def proxied_app(platform: Platform) -> Iterator[tuple[Any, TcpProxy]]:
    """An app of ``platform`` whose broker is reached through a proxy a test can cut."""
    real = BROKER_URLS[platform.broker]
    assert real is not None
    parts = urlsplit(real)
    host, port = parts.hostname or "127.0.0.1", parts.port or 0
    proxy = TcpProxy((host, port)).start()
    proxied_url = real.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}", 1)
    app = create_app(platform.settings.model_copy(update={"broker_url": proxied_url}),
                     set_as_current=False)  # fmt: skip
    try:
        yield app, proxy
    finally:
        proxy.cut()
        app.close()


def test_rolled_back_job_never_runs_and_job_committed_while_broker_unreachable_runs_when_back(
    outbox_platform: Platform,
) -> None:
    platform = outbox_platform
    task = platform.task("demo.work")
    sessions = sessions_for(platform.app)
    platform.worker(extra_env={"TASKS_OUTBOX_RELAY": "false"})  # only the proxied relay
    with proxied_app(platform) as (relay_app, proxy), relaying(relay_app):
        proxy.cut()  # the broker is unreachable from the relay
        with sessions() as session:
            with session.begin():
                rolled_back = task.apply_in(session, kwargs=work(platform, "rolled-back"))
                session.rollback()
            with session.begin():
                committed = task.delay_in(session, **work(platform, "committed"))
            with session.begin():  # submit(session=) takes the same path
                named = submit("demo.work", work(platform, "named"), app=platform.app,
                               session=session)  # fmt: skip

        def failed_twice() -> bool:
            with sessions() as session:
                row = session.get(OutboxMessage, committed.id)
                return row is not None and row.attempts >= 2 and row.published_at is None

        wait_for(failed_twice, 60, what="the relay to fail against the unreachable broker")
        with sessions() as session:
            assert is_pending(session, committed.id)
            assert session.get(Job, committed.id).state == "pending"
            assert "onnect" in (session.get(OutboxMessage, committed.id).last_error or "")
        assert platform.runs().starts() == []
        proxy.start()  # the broker is back
        wait_for(lambda: len(platform.runs().dones()) >= 2, 60, what="the committed jobs")
    with sessions() as session:
        assert session.get(Job, rolled_back.id) is None
        assert session.get(OutboxMessage, rolled_back.id) is None
        assert not is_pending(session, committed.id)
        assert not is_pending(session, named)
    assert sorted(run[0] for run in platform.runs().starts()) == ["committed", "named"]


def test_a_session_on_another_database_is_refused(outbox_platform: Platform) -> None:
    platform = outbox_platform
    task = platform.task("demo.work")
    with postgres_schema() as other_url:  # same server, another schema: another database
        engine = create_engine(other_url)
        try:
            with Session(engine) as session, pytest.raises(ConfigurationError) as refused:
                task.apply_in(session, kwargs={"label": "elsewhere"})
        finally:
            engine.dispose()
    assert "history database" in str(refused.value)


def test_relay_wakes_at_each_commit_not_at_its_poll(outbox_platform: Platform) -> None:
    platform = outbox_platform
    slow_poll = platform.settings.model_copy(update={"outbox_poll_interval": 60.0})
    relay_app = create_app(slow_poll, set_as_current=False)
    sessions = sessions_for(platform.app)
    try:
        with relaying(relay_app) as relay:
            wait_for(lambda: relay._listener is not None, 30, what="the relay to LISTEN")
            for number in range(1, 4):  # each commit wakes it again
                with sessions.begin() as session:
                    platform.task("demo.noop").apply_in(session)
                wait_for(lambda n=number: relay.stats.published == n, 20,
                         what=f"job {number} published long before the 60 s poll")  # fmt: skip
    finally:
        relay_app.close()
