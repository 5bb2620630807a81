"""Error fingerprints: message normalisation, fingerprints, and grouping dead letters by them."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tasks_platform.deadletter import DeadLetter, group_letters
from tasks_platform.fingerprint import FINGERPRINT_LENGTH, MESSAGE_LIMIT, fingerprint, normalise


@pytest.mark.parametrize(
    ("message", "normalised"),
    [
        ("timeout after 3.2s on order 1234", "timeout after <n>s on order <n>"),
        ("order-17: rejected for good", "order-<n>: rejected for good"),
        ("HTTP 503 from 10.0.0.12:5432", "HTTP <n> from <n>:<n>"),
        ("version v1.2.3 refused", "version v<n> refused"),
        ("balance -42.50 below zero", "balance -<n> below zero"),
        ("GET https://api.example.com/v1/orders/123?x=1. failed", "GET <url>. failed"),
        ("(see http://x.io/a/9)", "(see <url>)"),
        ("mail to bob.smith+news@example.co.uk bounced", "mail to <email> bounced"),
        ("KeyError 'user_42' can't be found", "KeyError <str> can't be found"),
        ('field "email" is required', "field <str> is required"),
        ("expired at 2024-05-01T10:11:12.123Z", "expired at <time>"),
        ("window 2024-05-01 10:11:12+02:00 to 23:59:59", "window <time> to <time>"),
        ("due 2024-05-01", "due <time>"),
        ("job 0B7F2C5E-1d2a-4c7e-9a57-3f0e8d1c2b4a lost", "job <uuid> lost"),
        ("<Conn object at 0x7f3a2b9c10>", "<Conn object at <hex>>"),
        ("commit 3f9a2c1 and sha 9c0ffee123abc", "commit <hex> and sha <hex>"),
        ("token tk_3f9a2c expired", "token <id> expired"),
        ("ulid 01ARZ3NDEKTSV4RRFFQ69G5FAV unknown", "ulid <id> unknown"),
        ("  many\n\tspaces   here ", "many spaces here"),
    ],
)
def test_normalise_replaces_the_parts_that_vary(message: str, normalised: str) -> None:
    assert normalise(message) == normalised


@pytest.mark.parametrize(
    "message",
    [
        "connection refused",
        "deadbeef facade decade",  # hex letters only: words, not ids
        "SimulatedOutage: can't connect, it's down",  # apostrophes are not quotes
        "utf encoding error",
    ],
)
def test_normalise_keeps_plain_words(message: str) -> None:
    assert normalise(message) == message


@pytest.mark.parametrize(
    "message",
    [
        "timeout after 3.2s on order 1234 for 'bob' at 2024-05-01T10:11:12Z",
        "GET https://x.io/9 by a@b.io id 0b7f2c5e-1d2a-4c7e-9a57-3f0e8d1c2b4a 0xff tk_3f9a2c",
        "",
    ],
)
def test_normalise_is_idempotent(message: str) -> None:
    once = normalise(message)
    assert normalise(once) == once


def test_normalise_bounds_a_huge_message() -> None:
    huge = "payload " + "word " * 10_000
    normalised = normalise(huge)
    assert len(normalised) == MESSAGE_LIMIT
    assert normalised.endswith("...")
    assert normalise(huge + " more") == normalised, "differences past the bound do not split"


def test_fingerprint_groups_messages_that_differ_only_in_variable_parts() -> None:
    first = fingerprint("demo.work", "Timeout", "timeout after 3.2s on order 1234")
    second = fingerprint("demo.work", "Timeout", "timeout after 5.1s on order 99")
    assert first == second
    assert len(first) == FINGERPRINT_LENGTH
    assert int(first, 16) >= 0, "hex digits"


@pytest.mark.parametrize(
    ("job", "exception_type", "message"),
    [
        ("demo.send_email", "Timeout", "timeout after 3.2s on order 1234"),  # other job type
        ("demo.work", "ConnectionError", "timeout after 3.2s on order 1234"),  # other exception
        ("demo.work", "Timeout", "timeout after 3.2s on invoice 1234"),  # other words
        (None, "Timeout", "timeout after 3.2s on order 1234"),  # no job type
    ],
)
def test_fingerprint_separates_different_errors(
    job: str | None, exception_type: str, message: str
) -> None:
    reference = fingerprint("demo.work", "Timeout", "timeout after 1s on order 1")
    assert fingerprint(job, exception_type, message) != reference


def test_fingerprint_is_a_short_sha256_of_job_exception_and_normalised_message() -> None:
    # stable across processes and releases (no salted hash()): changing it splits every group
    key = "demo.work\x1fSimulatedRejection\x1forder-<n>: rejected for good"
    assert hashlib.sha256(key.encode()).hexdigest()[:FINGERPRINT_LENGTH] == "acba9d4f1926"
    assert fingerprint("demo.work", "SimulatedRejection", "order-17: rejected for good") == (
        "acba9d4f1926"
    )


def test_fingerprint_does_not_confuse_fields_through_the_separator() -> None:
    assert fingerprint("a", "b c", "d") != fingerprint("a b", "c", "d")


# -- group_letters ---------------------------------------------------------------------------
def letter(task_id: str | None, message: str, **overrides: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "task_id": task_id,
        "job": "demo.work",
        "queue": "default",
        "reason": "permanent_error",
        "exception_type": "SimulatedRejection",
        "exception_message": message,
        "traceback": "",
        "attempts": 1,
        "dead_at": 1_700_000_000.0,
        "content_type": "application/json",
        "payload": [[], {}, {}],
        "headers": {},
    }
    values.update(overrides)
    return DeadLetter(**values)


def test_group_letters_collects_exactly_the_members_of_each_group() -> None:
    letters = [
        letter("a", "order-1: rejected for good", dead_at=100.0),
        letter("b", "order-22: outage on attempt 4 of 3", exception_type="SimulatedOutage"),
        letter("c", "order-333: rejected for good", dead_at=300.0),
        letter("d", "order-4444: rejected for good", dead_at=200.0, queue="email"),
    ]
    rejected, outage = group_letters(letters)

    assert rejected.task_ids == ("a", "d", "c")  # in the order they died, not as listed
    assert rejected.count == 3
    assert rejected.name == "demo.work"
    assert rejected.exc_type == "SimulatedRejection"
    assert rejected.message == "order-<n>: rejected for good"
    assert rejected.example == "order-1: rejected for good"
    assert rejected.queues == ("default", "email")
    assert (rejected.first_at, rejected.last_at) == (100.0, 300.0)
    assert rejected.fingerprint == letters[0].fingerprint
    assert outage.task_ids == ("b",)
    assert outage.message == "order-<n>: outage on attempt <n> of <n>"
    assert outage.fingerprint != rejected.fingerprint


def test_group_letters_counts_the_copies_of_one_job_once() -> None:
    letters = [letter("a", "boom 1"), letter("a", "boom 1"), letter(None, "boom 2")]
    [group] = group_letters(letters)
    assert group.task_ids == ("a",)
    assert group.count == 2, "job a once, plus the letter without a task id"


def test_group_letters_puts_the_largest_then_the_most_recent_group_first() -> None:
    letters = [
        letter("old", "x", exception_type="Old", dead_at=1.0),
        letter("new", "x", exception_type="New", dead_at=2.0),
        letter("big1", "x", exception_type="Big", dead_at=0.5),
        letter("big2", "x", exception_type="Big", dead_at=None),
    ]
    assert [g.exc_type for g in group_letters(letters)] == ["Big", "New", "Old"]


def test_group_letters_of_nothing_is_empty() -> None:
    assert group_letters([]) == []


def test_group_as_dict_is_json_ready() -> None:
    [group] = group_letters([letter("a", "boom", dead_at=None)])
    summary = group.as_dict()
    assert summary["task_ids"] == ["a"]
    assert summary["queues"] == ["default"]
    assert (summary["first_at"], summary["last_at"]) == (None, None)
    assert set(summary) == {"fingerprint", "name", "exc_type", "message", "example", "queues",
                            "count", "task_ids", "first_at", "last_at"}  # fmt: skip


def test_letter_as_dict_carries_its_fingerprint() -> None:
    dead = letter("a", "order-1: rejected for good")
    assert (
        dead.as_dict()["fingerprint"]
        == dead.fingerprint
        == fingerprint("demo.work", "SimulatedRejection", "order-9: rejected for good")
    )
