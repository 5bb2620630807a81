"""EventSender: a worker's buffered job events published from a thread of their own."""

from __future__ import annotations

import threading
import time

import pytest

from tasks_platform.event_sender import EventSender


class Flushes:
    """A flush that counts its calls and what was buffered when each one ran."""

    def __init__(self) -> None:
        self.buffer: list[int] = []
        self.published: list[list[int]] = []
        self.called = threading.Event()
        self.fail_next = False

    def __call__(self) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("broker went away")
        batch, self.buffer = self.buffer, []
        self.published.append(batch)
        self.called.set()

    def wait(self) -> None:
        assert self.called.wait(5), "the sender never flushed"
        self.called.clear()


def test_a_woken_sender_publishes_at_once_from_its_own_thread() -> None:
    threads: list[str] = []
    flushes = Flushes()

    def flush() -> None:
        threads.append(threading.current_thread().name)
        flushes()

    sender = EventSender(flush, interval=0.0)
    try:
        flushes.buffer.append(1)
        started = time.monotonic()
        sender.wake()
        flushes.wait()
        assert time.monotonic() - started < 1.0
        assert flushes.published == [[1]]
        assert threads == ["job-events"]
    finally:
        sender.stop()


def test_events_buffered_within_the_interval_go_out_in_one_publish() -> None:
    flushes = Flushes()
    sender = EventSender(flushes, interval=0.5)
    try:
        flushes.buffer.append(1)
        sender.wake()
        flushes.wait()  # the first publish goes at once
        for n in range(2, 12):  # then ten events, each waking the sender, within the interval
            flushes.buffer.append(n)
            sender.wake()
        flushes.wait()
        assert flushes.published == [[1], list(range(2, 12))]
    finally:
        sender.stop()


def test_stop_publishes_what_is_still_buffered() -> None:
    flushes = Flushes()
    sender = EventSender(flushes, interval=5.0)
    flushes.buffer.append(1)
    sender.wake()
    flushes.wait()
    flushes.buffer.append(2)  # buffered while the sender waits out its interval
    sender.wake()
    started = time.monotonic()
    sender.stop()
    assert time.monotonic() - started < 2.0, "stop waited for the interval"
    assert flushes.published == [[1], [2]]


def test_a_failed_publish_is_logged_and_the_next_wake_publishes_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flushes = Flushes()
    flushes.fail_next = True
    sender = EventSender(flushes, interval=0.0)
    try:
        flushes.buffer.append(1)
        sender.wake()
        deadline = time.monotonic() + 5
        while "could not publish" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "could not publish the worker's job events" in caplog.text
        sender.wake()
        flushes.wait()
        assert flushes.published == [[1]]
    finally:
        sender.stop()
