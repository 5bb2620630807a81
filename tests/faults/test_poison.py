"""Poison messages published raw onto a work queue: each is dead-lettered once, with its reason.

tests/integration/test_bad_messages.py already covers, on every broker, an undecodable body, an
unknown task name, a message with no task header, and a pickle body (refused, never executed).
This adds what it does not: a payload the job's schema refuses, a body that is not a Celery
``[args, kwargs, embed]`` triple (it used to stop the whole worker: Celery's request raised in
the consumer), and an oversized body (over ``TASKS_MAX_MESSAGE_BYTES``, so
dead-lettered unread). For all of them: each lands in the dead-letter queue exactly once (never
redelivered), never ran or ran once, the worker stays up, and the jobs around them run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Platform, make_platform, wait_for

MESSAGE_LIMIT = 4096


@pytest.fixture(params=["redis", "rabbitmq"])
def platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    with make_platform(request.param, tmp_path, max_payload_bytes=1024,
                       max_message_bytes=MESSAGE_LIMIT) as made:  # fmt: skip
        yield made


def _publish_raw(platform: Platform, task_id: str, body: bytes) -> None:
    """A message with Celery's headers for ``demo.work`` and ``body`` as is (JSON content)."""
    queue = platform.app.topology.work_queue("default")
    headers = {"lang": "py", "task": "demo.work", "id": task_id, "retries": 0,
               "root_id": task_id, "parent_id": None, "group": None}  # fmt: skip
    with platform.app.connection_for_write() as connection:
        connection.Producer().publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, headers=headers,
            content_type="application/json", content_encoding="utf-8", declare=[queue],
        )  # fmt: skip


def _body(kwargs: Any) -> bytes:
    return json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                    "chord": None}]).encode()  # fmt: skip


def test_schema_invalid_malformed_and_oversized_messages_are_dead_lettered_once(
    platform: Platform,
) -> None:
    runs = platform.runs()
    worker = platform.worker(concurrency=1)
    work = platform.task("demo.work")
    work.delay(label="before", record_to=str(runs.path))
    _publish_raw(platform, "schema-1", _body({"label": "bad", "duration": "soon", "extra": 1,
                                              "record_to": str(runs.path)}))  # fmt: skip
    _publish_raw(platform, "shape-1", json.dumps({"not": "a celery body"}).encode())
    padding = "x" * 3 * MESSAGE_LIMIT
    oversized = _body({"label": "huge", "record_to": str(runs.path), "pad": padding})
    _publish_raw(platform, "huge-1", oversized)
    work.delay(label="after", record_to=str(runs.path))

    wait_for(lambda: runs.dones("after") and runs.dones("before"), 60, what="the good jobs")
    letters = wait_for(lambda: (found := platform.dead_letters().list()) and len(found) >= 3
                       and found, 60, what="three dead letters")  # fmt: skip
    by_id = {letter.task_id: letter for letter in letters}
    assert by_id["schema-1"].reason == "permanent_error"
    assert by_id["schema-1"].exception_type == "InvalidPayload"
    assert "duration" in by_id["schema-1"].exception_message
    assert by_id["shape-1"].reason == "invalid_message"
    assert by_id["shape-1"].exception_type == "MalformedMessage"
    assert by_id["huge-1"].reason == "invalid_message"
    assert by_id["huge-1"].exception_type == "MessageTooLarge"
    assert "TASKS_MAX_MESSAGE_BYTES" in by_id["huge-1"].exception_message

    time.sleep(2)  # were any of them coming back, they would by now (prefetch 1, one process)
    assert sorted(letter.task_id for letter in platform.dead_letters().list()) == [
        "huge-1", "schema-1", "shape-1",
    ]  # fmt: skip
    assert runs.starts("bad") == []  # refused by its schema before the body ran
    assert runs.starts("huge") == []  # dead-lettered unread
    assert worker.process is not None
    assert worker.process.poll() is None  # the worker is still up
    work.delay(label="last", record_to=str(runs.path))
    wait_for(lambda: runs.dones("last"), 60, what="a job after the poison")
    assert platform.app.control.inspect(timeout=2).active_queues()  # answers, not stalled
