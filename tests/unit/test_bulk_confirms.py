"""Bulk submission helpers that need no broker: job ids, and counting publisher confirms."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import pytest

from tasks_platform.bulk import _Confirms, _new_ids, _random_hex
from tasks_platform.errors import PublishNotConfirmed


def test_bulk_ids_are_distinct_random_uuids() -> None:
    ids = _new_ids(500)
    assert len(set(ids)) == 500
    for value in ids:
        parsed = uuid.UUID(value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value  # as str(uuid4()) writes it
    assert _new_ids(0) == []


def test_bulk_event_ids_are_distinct_32_hex_digits() -> None:
    ids = _random_hex(500)
    assert len(set(ids)) == 500
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in ids)


class ScriptedChannel:
    """A py-amqp channel stand-in whose connection delivers scripted acks and nacks."""

    def __init__(self, script: list[tuple[str, int, bool]]) -> None:
        self._confirm_selected = True
        self.events: defaultdict[str, set[Any]] = defaultdict(set)
        self.script = list(script)
        self.connection = self

    def _basic_publish(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("not published in these tests")

    def drain_events(self, timeout: float | None = None) -> None:
        if not self.script:
            raise TimeoutError
        kind, tag, multiple = self.script.pop(0)
        for callback in list(self.events[kind]):
            callback(tag, multiple)


@pytest.mark.parametrize(
    "script",
    [
        [("basic_ack", 5, True)],  # one ack for all
        [("basic_ack", 2, False), ("basic_ack", 1, False), ("basic_ack", 5, True)],
        [("basic_ack", 3, True), ("basic_ack", 5, False), ("basic_ack", 4, False)],
    ],
    ids=["multiple", "singles-then-multiple", "out-of-order"],
)
def test_confirms_count_single_and_multiple_acks(script: list[tuple[str, int, bool]]) -> None:
    confirms = _Confirms(ScriptedChannel(script))
    confirms.wait(5, timeout=5)
    assert confirms.confirmed() == 5


def test_a_nack_or_a_missing_confirm_is_an_error() -> None:
    nacked = _Confirms(ScriptedChannel([("basic_ack", 2, True), ("basic_nack", 3, False)]))
    with pytest.raises(PublishNotConfirmed, match="nacked"):
        nacked.wait(3, timeout=5)
    silent = _Confirms(ScriptedChannel([("basic_ack", 1, False)]))
    with pytest.raises(PublishNotConfirmed, match="confirmed 1 of 2"):
        silent.wait(2, timeout=0.2)
