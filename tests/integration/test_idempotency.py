"""Idempotency keys for any job, on real brokers, with the history on SQLite and PostgreSQL.

A key is claimed through the job's history row, inserted before the message is published:
these tests count the messages the broker holds (before any worker runs) and the runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy
from celery.exceptions import QueueNotFound
from conftest import BROKER_URLS, Platform, make_platform, postgres_schema, wait_for
from kombu import Connection
from sqlalchemy.orm import Session
from tcp_proxy import TcpProxy

import tasks_platform
from tasks_platform import intake
from tasks_platform.errors import (
    ConfigurationError,
    IdempotencyConflict,
    InvalidPayload,
    PublishNotConfirmed,
)
from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import Base, Job
from tasks_platform.intake import idempotent_id
from tasks_platform.process import settings_env
from tasks_platform.stats.broker import queue_depths


@contextmanager
def keyed_platform(
    broker: str, history: str, tmp_path: Path, **overrides: Any
) -> Iterator[Platform]:
    """A platform whose history is SQLite (the embedded default) or a fresh PostgreSQL schema."""
    if history == "sqlite":
        with make_platform(broker, tmp_path, **overrides) as platform, _history_of(platform):
            yield platform
        return
    with (
        postgres_schema() as url,
        make_platform(broker, tmp_path, database_url=url, **overrides) as platform,
    ):
        engine = create_history_engine(platform.settings)
        Base.metadata.create_all(engine)
        engine.dispose()
        with _history_of(platform):
            yield platform


@contextmanager
def _history_of(platform: Platform) -> Iterator[None]:
    platform.history = create_history_engine(platform.settings)
    try:
        yield
    finally:
        intake.close_all()  # this process's connections to this history, for the keys
        platform.history.dispose()


def waiting(platform: Platform, family: str = "default") -> int:
    """Messages the broker holds in ``family``'s work queue."""
    with platform.app.connection_for_read() as connection:
        depths = queue_depths(connection, platform.app.topology)
    return sum(d.messages for d in depths if d.queue == family)


def rows(platform: Platform, *job_ids: str) -> dict[str, Job]:
    with Session(platform.history) as session:
        found = session.scalars(sqlalchemy.select(Job).where(Job.id.in_(job_ids))).all()
        return {job.id: job for job in found}


#: the tests whose behaviour differs between the brokers, each with a history of its own
on_both_brokers = pytest.mark.parametrize(
    ("broker", "history"),
    [("redis", "sqlite"), ("rabbitmq", "postgres")],
    ids=["redis-sqlite", "rabbitmq-postgres"],
)


def state_of(platform: Platform, job_id: str, state: str) -> Job:
    def reached() -> Job | None:
        job = rows(platform, job_id).get(job_id)
        return job if job is not None and job.state == state else None

    return wait_for(reached, 60, what=f"job {job_id} to be {state}")  # type: ignore[no-any-return]


@on_both_brokers
def test_a_key_queues_one_job_per_tenant_and_a_failed_publish_frees_it(
    broker: str, history: str, tmp_path: Path
) -> None:
    with keyed_platform(broker, history, tmp_path) as platform:
        work, runs = platform.task("demo.work"), platform.runs()
        payload = {"label": "once", "record_to": str(runs.path)}

        first = work.apply_async(kwargs=payload, idempotency_key="order-1")
        again = work.apply_async(kwargs=payload, idempotency_key="order-1")
        by_name = tasks_platform.submit("demo.work", payload, idempotency_key="order-1",
                                        app=platform.app)  # fmt: skip
        assert first.id == again.id == by_name == idempotent_id(None, "order-1")
        assert waiting(platform) == 1  # one message for three submissions

        # the same key in another tenant is another job
        theirs = work.apply_async(kwargs={**payload, "label": "theirs"}, tenant="globex",
                                  idempotency_key="order-1")  # fmt: skip
        assert theirs.id != first.id
        assert waiting(platform) == 2

        # the same key for another job type is refused, and queues nothing
        with pytest.raises(IdempotencyConflict, match=r"used for a demo\.work job") as refused:
            platform.task("demo.tally").apply_async(kwargs={"add": 1}, idempotency_key="order-1")
        assert refused.value.code == "idempotency_conflict"
        assert waiting(platform) == 2

        # a publish that fails leaves no row behind: the key can be used again
        with pytest.raises(QueueNotFound, match="nowhere"):
            work.apply_async(kwargs={**payload, "label": "late"}, idempotency_key="order-2",
                             queue="nowhere")  # fmt: skip
        assert rows(platform, idempotent_id(None, "order-2")) == {}
        assert waiting(platform) == 2
        with pytest.raises(InvalidPayload, match="idempotency key is 1-255 characters"):
            work.apply_async(kwargs=payload, idempotency_key="")
        late = work.apply_async(kwargs={**payload, "label": "late"}, idempotency_key="order-2")
        assert late.id == idempotent_id(None, "order-2")

        platform.worker(pool="threads")
        for job_id in (first.id, theirs.id, late.id):
            state_of(platform, job_id, "succeeded")
        assert [len(runs.starts(label)) for label in ("once", "theirs", "late")] == [1, 1, 1]
        recorded = rows(platform, first.id, theirs.id)
        assert (recorded[first.id].idempotency_key, recorded[first.id].tenant) == ("order-1", None)
        assert (recorded[theirs.id].idempotency_key, recorded[theirs.id].tenant) == (
            "order-1",
            "globex",
        )
        # a key names its job as long as the job's row is kept: still the first job
        assert work.apply_async(kwargs=payload, idempotency_key="order-1").id == first.id
        assert waiting(platform) == 0


@dataclass
class LostAnswer:
    """A keyed ``demo.work`` job whose publish reached the broker but whose answer was lost
    with the connection (a proxy between the platform and the broker dropped it, then cut)."""

    platform: Platform
    proxy: TcpProxy
    direct: Connection  #: to the broker itself, not through the proxy
    payload: dict[str, Any]
    job_id: str
    #: what the producer was told (nothing, if the publish returned)
    outcome: list[BaseException]

    def depth(self) -> int:
        """Messages in the default work queue, asked of the broker itself."""
        depths = queue_depths(self.direct, self.platform.app.topology)
        return sum(d.messages for d in depths if d.queue == "default")

    def run_all(self) -> Job:
        """Start a worker; the job's row once it succeeded and every copy was taken."""
        self.platform.worker(pool="threads")
        row = state_of(self.platform, self.job_id, "succeeded")
        wait_for(lambda: self.depth() == 0, 30, what="every copy to be taken")
        return row


@contextmanager
def answer_lost(
    broker: str, history: str, tmp_path: Path, key: str, *, back_at_once: bool
) -> Iterator[LostAnswer]:
    """Submit with ``key`` while the proxy drops the broker's answers, cut the connection once
    the broker holds the message, and (``back_at_once``) let kombu's next try through."""
    real = urlsplit(BROKER_URLS[broker])
    proxy = TcpProxy((real.hostname or "127.0.0.1", real.port or 0)).start()
    proxied = real._replace(netloc=real.netloc.replace(f":{real.port}", f":{proxy.port}"))
    try:
        with keyed_platform(broker, history, tmp_path, broker_url=proxied.geturl()) as platform:
            runs = platform.runs()
            lost = LostAnswer(platform, proxy, Connection(BROKER_URLS[broker]),
                              {"label": key, "record_to": str(runs.path)},
                              idempotent_id(None, key), [])  # fmt: skip
            try:
                proxy.hold_replies(after=key.encode())  # the job's key, in its headers
                producer = threading.Thread(target=_submit_into, daemon=True,
                                            args=(platform.task("demo.work"), lost.payload, key,
                                                  lost.outcome))  # fmt: skip
                producer.start()
                wait_for(lambda: lost.depth() == 1, 30, what="the broker to take it")
                proxy.cut()  # the connection is lost before its answer came back
                if back_at_once:
                    proxy.start()
                producer.join(60)
                yield lost
            finally:
                lost.direct.release()
    finally:
        proxy.cut()


@on_both_brokers
def test_a_publish_lost_after_the_broker_took_it_is_reported_and_the_key_runs_the_job_once(
    broker: str, history: str, tmp_path: Path
) -> None:
    """The broker takes the message, its answer is lost with the connection: the producer is
    told the job *may* be queued; submitting again with the key queues a second copy, and a
    worker runs one of the two."""
    with answer_lost(broker, history, tmp_path, "order-9", back_at_once=False) as lost:
        platform, work = lost.platform, lost.platform.task("demo.work")
        assert len(lost.outcome) == 1
        assert isinstance(lost.outcome[0], PublishNotConfirmed), repr(lost.outcome[0])
        assert "may be queued or not" in str(lost.outcome[0])
        assert rows(platform, lost.job_id)[lost.job_id].publish_uncertain  # the key keeps its row

        lost.proxy.start()
        again = work.apply_async(kwargs=lost.payload, idempotency_key="order-9")
        third = work.apply_async(kwargs=lost.payload, idempotency_key="order-9")
        assert again.id == third.id == lost.job_id
        assert lost.depth() == 2  # the lost copy and one more, no third

        row = lost.run_all()
        assert len(platform.runs().starts("order-9")) == 1  # one copy ran, the other was dropped
        assert "published twice" in platform.logs()
        assert row.delivered_by is not None
        assert not row.publish_uncertain
        time.sleep(2)  # the worker's history writer writes within 0.25 s when idle
        # dropping the second copy recorded nothing over the job's row
        assert rows(platform, lost.job_id)[lost.job_id].state == "succeeded"
        # the key is taken now: nothing more is queued
        assert work.apply_async(kwargs=lost.payload, idempotency_key="order-9").id == lost.job_id
        assert lost.depth() == 0


@on_both_brokers
def test_a_publish_lost_after_the_broker_took_it_and_retried_at_once_runs_the_job_once(
    broker: str, history: str, tmp_path: Path
) -> None:
    """The connection is lost after the broker took the message and kombu's retry, a moment
    later, succeeds: the broker holds two copies, each its own publish, and one runs."""
    with answer_lost(broker, history, tmp_path, "order-10", back_at_once=True) as lost:
        assert lost.outcome == []  # the producer was told it is queued: it is, twice
        assert lost.depth() == 2

        lost.run_all()
        assert len(lost.platform.runs().starts("order-10")) == 1
        assert "published twice" in lost.platform.logs()


def _submit_into(
    task: Any, payload: dict[str, Any], key: str, outcome: list[BaseException]
) -> None:
    try:
        task.apply_async(kwargs=payload, idempotency_key=key)
    except BaseException as exc:  # what the producer is told: checked by the test
        outcome.append(exc)


_SUBMITTER = """
import sys, threading, time
import tasks_platform
start_at, key = float(sys.argv[1]), sys.argv[2]
ids, errors = [], []
def go():
    time.sleep(max(start_at - time.time(), 0))
    try:
        ids.append(tasks_platform.submit("demo.work", {"label": "race"}, idempotency_key=key,
                                         tenant="acme"))
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=go) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(" ".join(ids)); print("\\n".join(errors), file=sys.stderr)
"""


def test_concurrent_submissions_of_one_key_from_threads_and_processes_give_one_job(
    tmp_path: Path,
) -> None:
    with keyed_platform("redis", "postgres", tmp_path) as platform:
        start_at = time.time() + 4  # after the child processes imported the platform
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
        env |= settings_env(platform.settings)
        children = [
            subprocess.Popen([sys.executable, "-c", _SUBMITTER, str(start_at), "race-1"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]  # fmt: skip
        ids: list[str] = []
        errors: list[BaseException] = []

        def submit() -> None:
            time.sleep(max(start_at - time.time(), 0))
            try:
                task = platform.task("demo.work")
                ids.append(task.apply_async(kwargs={"label": "race"}, tenant="acme",
                                            idempotency_key="race-1").id)  # fmt: skip
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        outputs = [child.communicate(timeout=60) for child in children]

        assert errors == []
        for child, (out, err) in zip(children, outputs, strict=True):
            assert child.returncode == 0, err
            assert err.strip() == "", err
            ids += out.split()
        assert len(ids) == 16
        assert set(ids) == {idempotent_id("acme", "race-1")}
        assert waiting(platform) == 1
        with Session(platform.history) as session:
            count = session.scalar(sqlalchemy.select(sqlalchemy.func.count()).select_from(Job))
        assert count == 1


def test_an_idempotency_key_without_a_history_is_refused(tmp_path: Path) -> None:
    with make_platform("embedded", tmp_path, history_enabled=False) as platform:
        work = platform.task("demo.work")
        with pytest.raises(ConfigurationError, match="TASKS_HISTORY_ENABLED"):
            work.apply_async(kwargs={"label": "x"}, idempotency_key="k")
