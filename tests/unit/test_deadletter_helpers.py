"""Dead-letter helpers that need no broker: death headers, reading a letter, replay headers."""

from __future__ import annotations

import json
import pickle
import time
from typing import Any

import pytest

from tasks_platform.deadletter import (
    HEADER_PREFIX,
    REPLAYS_HEADER,
    DeadReason,
    Death,
    read_letter,
)
from tasks_platform.deadletter.letters import bounded
from tasks_platform.deadletter.publish import replay_headers
from tasks_platform.jobs.declaration import DELIVERIES_HEADER

DEAD_KEYS = {
    "x-dead-reason",
    "x-dead-exception-type",
    "x-dead-exception",
    "x-dead-traceback",
    "x-dead-attempts",
    "x-dead-queue",
    "x-dead-at",
}
TASK_ID = "0b7f2c5e-1d2a-4c7e-9a57-3f0e8d1c2b4a"


class FakeMessage:
    """The attributes of a kombu Message the helpers read."""

    def __init__(
        self,
        *,
        headers: dict[str, Any] | None = None,
        body: bytes | str | None = b"[[], {}, {}]",
        content_type: str | None = "application/json",
        delivery_info: dict[str, Any] | None = None,
    ) -> None:
        self.headers = headers
        self.body = body
        self.content_type = content_type
        self.content_encoding = "utf-8"
        self.delivery_info = delivery_info or {"routing_key": "default"}
        self.properties: dict[str, Any] = {}


def celery_headers(**extra: Any) -> dict[str, Any]:
    """Headers of a Celery protocol-2 task message."""
    headers: dict[str, Any] = {
        "lang": "py",
        "task": "demo.work",
        "id": TASK_ID,
        "root_id": TASK_ID,
        "retries": 3,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
    }
    headers.update(extra)
    return headers


def death(**overrides: Any) -> Death:
    options: dict[str, Any] = {
        "reason": DeadReason.RETRIES_EXHAUSTED,
        "exception_type": "SimulatedOutage",
        "exception_message": "outage on attempt 4 of 9",
        "traceback": "Traceback (most recent call last):\n  ...\nSimulatedOutage",
        "attempts": 4,
    }
    options.update(overrides)
    return Death(**options)


tripped: list[str] = []


def _trip() -> str:
    tripped.append("unpickled")
    return "unpickled"


class Tripwire:
    """Unpickling this records it: proof that a body was (or was not) unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_trip, ())


# -- Death.headers ---------------------------------------------------------------------------
def test_death_headers_carry_every_dead_letter_key() -> None:
    before = time.time()
    headers = death().headers("ci7_default")
    after = time.time()
    assert set(headers) == DEAD_KEYS
    assert all(key.startswith(HEADER_PREFIX) for key in headers)
    assert headers["x-dead-reason"] == "retries_exhausted"
    assert headers["x-dead-exception-type"] == "SimulatedOutage"
    assert headers["x-dead-exception"] == "outage on attempt 4 of 9"
    assert headers["x-dead-traceback"].startswith("Traceback")
    assert headers["x-dead-attempts"] == 4
    assert headers["x-dead-queue"] == "ci7_default"
    assert before <= headers["x-dead-at"] <= after


def test_death_headers_are_json_and_amqp_friendly() -> None:
    headers = death().headers("default")
    assert json.loads(json.dumps(headers)) == headers


@pytest.mark.parametrize("reason", list(DeadReason))
def test_death_headers_carry_the_reason_value(reason: DeadReason) -> None:
    assert death(reason=reason).headers("default")["x-dead-reason"] == reason.value


def test_death_headers_bound_a_long_message_and_traceback() -> None:
    headers = death(exception_message="m" * 50_000, traceback="t" * 500_000).headers("default")
    assert len(headers["x-dead-exception"]) <= 2_000
    assert len(headers["x-dead-traceback"]) <= 16_000
    assert headers["x-dead-exception"].endswith("... (truncated)")
    assert headers["x-dead-traceback"].endswith("... (truncated)")
    assert headers["x-dead-traceback"].startswith("t" * 1000)


@pytest.mark.parametrize(
    ("length", "truncated"), [(0, False), (99, False), (100, False), (101, True)]
)
def test_bounded_keeps_text_up_to_the_limit(length: int, truncated: bool) -> None:
    text = "x" * length
    cut = bounded(text, 100)
    assert len(cut) <= 100
    assert (cut != text) is truncated
    if truncated:
        assert cut.endswith("\n... (truncated)")


# -- replay_headers -------------------------------------------------------------------------
def test_replay_headers_strip_death_marks_and_reset_retries() -> None:
    original = celery_headers(
        eta="2030-01-01T00:00:00+00:00",
        expires="2030-01-02T00:00:00+00:00",
        **{
            **death().headers("default"),
            "x-death": [{"reason": "rejected", "queue": "default", "count": 1}],
            DELIVERIES_HEADER: 3,
        },
    )
    message = FakeMessage(headers=original)
    snapshot = dict(original)
    headers = replay_headers(message)  # type: ignore[arg-type]
    assert not [key for key in headers if key.startswith(HEADER_PREFIX)]
    assert "x-death" not in headers
    assert DELIVERIES_HEADER not in headers
    assert "eta" not in headers
    assert "expires" not in headers
    assert headers["retries"] == 0
    assert headers[REPLAYS_HEADER] == 1
    assert headers["id"] == TASK_ID
    assert headers["task"] == "demo.work"
    assert headers["timelimit"] == [None, None]
    assert message.headers == snapshot, "the received message is left alone"


@pytest.mark.parametrize(("before", "after"), [(None, 1), (1, 2), (5, 6), ("2", 3)])
def test_replay_headers_count_replays(before: object, after: int) -> None:
    headers = celery_headers()
    if before is not None:
        headers[REPLAYS_HEADER] = before
    assert replay_headers(FakeMessage(headers=headers))[REPLAYS_HEADER] == after  # type: ignore[arg-type]


def test_replay_headers_do_not_invent_a_retries_header() -> None:
    headers = replay_headers(FakeMessage(headers={"id": TASK_ID}))  # type: ignore[arg-type]
    assert headers == {"id": TASK_ID, REPLAYS_HEADER: 1}


def test_replay_headers_of_a_message_without_headers() -> None:
    assert replay_headers(FakeMessage(headers=None)) == {REPLAYS_HEADER: 1}  # type: ignore[arg-type]


# -- read_letter -----------------------------------------------------------------------------
def test_read_letter_parses_the_platform_headers() -> None:
    headers = celery_headers(**death().headers("default"))
    body = json.dumps([[], {"label": "x"}, {"callbacks": None}]).encode()
    letter = read_letter("default", FakeMessage(headers=headers, body=body))  # type: ignore[arg-type]
    assert letter.task_id == TASK_ID
    assert letter.job == "demo.work"
    assert letter.queue == "default"
    assert letter.reason == "retries_exhausted"
    assert letter.exception_type == "SimulatedOutage"
    assert letter.exception_message == "outage on attempt 4 of 9"
    assert letter.traceback.startswith("Traceback")
    assert letter.attempts == 4
    assert letter.dead_at == headers["x-dead-at"]
    assert letter.content_type == "application/json"
    assert letter.payload == [[], {"label": "x"}, {"callbacks": None}]
    assert letter.headers == headers


def test_read_letter_as_dict_is_json_ready() -> None:
    headers = celery_headers(**death().headers("default"))
    letter = read_letter("default", FakeMessage(headers=headers))  # type: ignore[arg-type]
    summary = letter.as_dict()
    assert "headers" not in summary
    assert summary["task_id"] == TASK_ID
    assert json.loads(json.dumps(summary)) == summary


@pytest.mark.parametrize("reason", ["rejected", "expired", "maxlen", "delivery_limit"])
def test_read_letter_falls_back_to_rabbitmq_x_death(reason: str) -> None:
    headers = celery_headers(
        retries=2, **{"x-death": [{"reason": reason, "queue": "ci7_email", "count": 1}]}
    )
    letter = read_letter("email", FakeMessage(headers=headers))  # type: ignore[arg-type]
    assert letter.reason == DeadReason.BROKER.value == "broker"
    assert letter.exception_type == f"rabbitmq:{reason}"
    assert letter.exception_message == ""
    assert letter.traceback == ""
    assert letter.attempts == 3, "retries made + 1"
    assert letter.dead_at is None
    assert letter.queue == "email"


def test_read_letter_of_a_message_without_any_headers() -> None:
    letter = read_letter("default", FakeMessage(headers=None))  # type: ignore[arg-type]
    assert letter.task_id is None
    assert letter.job is None
    assert letter.reason == "broker"
    assert letter.exception_type == "rabbitmq:unknown"
    assert letter.attempts == 1


def test_read_letter_never_unpickles_a_pickle_body() -> None:
    tripped.clear()
    body = pickle.dumps(Tripwire())
    message = FakeMessage(
        headers=celery_headers(**death().headers("default")),
        body=body,
        content_type="application/x-python-serialize",
    )
    letter = read_letter("default", message)  # type: ignore[arg-type]
    assert letter.payload == {
        "undisplayable": f"{len(body)} bytes of application/x-python-serialize"
    }
    assert tripped == [], "the pickle body was unpickled"
    assert letter.reason == "retries_exhausted"


@pytest.mark.parametrize(
    "content_type", ["application/x-yaml", "application/x-msgpack", "text/plain", None]
)
def test_read_letter_shows_other_content_types_as_undisplayable(content_type: str | None) -> None:
    message = FakeMessage(body=b"\x00\x01\x02", content_type=content_type)
    letter = read_letter("default", message)  # type: ignore[arg-type]
    assert letter.payload == {"undisplayable": f"3 bytes of {content_type}"}


@pytest.mark.parametrize(
    "body",
    [
        b'[[], {"label": "caf\\u00e9"}, {}]',
        '[[], {"label": "café"}, {}]',
        bytearray(b'[[], {"label": "caf\\u00e9"}, {}]'),
    ],
    ids=["bytes", "str", "bytearray"],
)
def test_read_letter_parses_str_and_bytes_json_bodies(body: bytes | str) -> None:
    letter = read_letter("default", FakeMessage(body=body))  # type: ignore[arg-type]
    assert letter.payload == [[], {"label": "café"}, {}]


def test_read_letter_counts_a_str_body_in_utf8_bytes() -> None:
    message = FakeMessage(body="é" * 10, content_type="text/plain")
    assert read_letter("default", message).payload == {"undisplayable": "20 bytes of text/plain"}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (b"{not json", repr(b"{not json")),
        (b"\x80\x81\xfe", repr(b"\x80\x81\xfe")),
        ("[1, 2", repr(b"[1, 2")),
        (b"", repr(b"")),
        (None, repr(b"")),
    ],
    ids=["bad-json", "not-utf8", "str-bad-json", "empty", "none"],
)
def test_read_letter_reports_undecodable_json(body: bytes | str | None, shown: str) -> None:
    letter = read_letter("default", FakeMessage(body=body))  # type: ignore[arg-type]
    assert letter.payload == {"undecodable": shown}


def test_read_letter_bounds_an_undecodable_body() -> None:
    letter = read_letter("default", FakeMessage(body=b"<" * 10_000))  # type: ignore[arg-type]
    assert letter.payload == {"undecodable": repr(b"<" * 200)}
