"""Messages Celery would drop (undecodable, unknown task, pickle) end in the DLQ instead."""

from __future__ import annotations

import json
import pickle
from typing import Any

from conftest import Platform, wait_for


def _publish(platform: Platform, body: Any, *, content_type: str, headers: dict | None) -> None:
    queue = platform.app.topology.work_queue("default")
    with platform.app.connection_for_write() as connection:
        connection.Producer().publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, headers=headers,
            content_type=content_type, content_encoding="utf-8"
            if content_type == "application/json" else "binary", declare=[queue],
        )  # fmt: skip


def _headers(task: str, task_id: str) -> dict[str, Any]:
    return {"lang": "py", "task": task, "id": task_id, "retries": 0, "root_id": task_id}


def _letters_by_id(platform: Platform, count: int) -> dict[str | None, Any]:
    letters = wait_for(
        lambda: (found := platform.dead_letters().list()) and len(found) >= count and found,
        60, what=f"{count} dead letters",
    )  # fmt: skip
    return {letter.task_id: letter for letter in letters}


def test_undecodable_and_unknown_messages_are_dead_lettered_and_worker_keeps_serving(
    platform: Platform,
) -> None:
    runs = platform.runs()
    platform.worker()
    _publish(platform, json.dumps([[], {}, {}]), content_type="application/json",
             headers=_headers("no.such.job", "unknown-1"))  # fmt: skip
    _publish(platform, b"{not json", content_type="application/json",
             headers=_headers("demo.work", "garbled-1"))  # fmt: skip
    _publish(platform, b"\x00\x01 not a celery message", content_type="application/json",
             headers=None)  # fmt: skip
    platform.task("demo.work").delay(label="after", record_to=str(runs.path))

    letters = _letters_by_id(platform, 3)
    assert letters["unknown-1"].reason == "unknown_task"
    assert "no.such.job" in letters["unknown-1"].exception_message
    assert letters["garbled-1"].reason == "undecodable"
    assert letters[None].reason in ("undecodable", "invalid_message")
    assert len(platform.dead_letters().list()) == 3  # each exactly once
    wait_for(lambda: runs.dones("after"), 60, what="the next good job")


def test_pickle_message_is_refused_and_dead_lettered_never_executed(platform: Platform) -> None:
    runs = platform.runs()
    platform.worker()
    payload = {"label": "pickled", "record_to": str(runs.path)}
    _publish(platform, pickle.dumps(((), payload, {})),
             content_type="application/x-python-serialize",
             headers=_headers("demo.work", "pickle-1"))  # fmt: skip
    platform.task("demo.work").delay(label="after", record_to=str(runs.path))

    letters = _letters_by_id(platform, 1)
    assert letters["pickle-1"].exception_type == "ContentDisallowed"
    assert letters["pickle-1"].payload == {
        "undisplayable": f"{len(pickle.dumps(((), payload, {})))} bytes of "
        "application/x-python-serialize"
    }
    wait_for(lambda: runs.dones("after"), 60, what="the next good job")
    assert runs.starts("pickled") == []  # never executed


def test_dead_letter_of_a_bad_message_can_be_purged(platform: Platform) -> None:
    platform.worker()
    _publish(platform, json.dumps([[], {}, {}]), content_type="application/json",
             headers=_headers("no.such.job", "unknown-2"))  # fmt: skip
    _letters_by_id(platform, 1)

    assert platform.dead_letters().purge(task_id="unknown-2", actor="test") == 1
    assert platform.dead_letters().list() == []
