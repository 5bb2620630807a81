"""The HTTP job types without a worker: signatures, payload schemas, keys and alerts."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import httpx
import pytest

from tasks_platform import create_app
from tasks_platform.domain.webhooks import (
    EVENT_HEADER,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    deliver,
    encode_body,
    sign,
    verify_signature,
)
from tasks_platform.errors import InvalidPayload, PermanentError, TransientError
from tasks_platform.history.redaction import REDACTED, redact
from tasks_platform.jobs.declaration import JobContext
from tasks_platform.jobs.payments import Charge, charge, idempotency_key
from tasks_platform.settings import Settings

SECRET = "whsec_9d1f0c7e"
BODY = encode_body({"order": 42, "note": "größe"})
AT = 1_767_225_600


# -- webhook signatures ------------------------------------------------------------------------
def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{AT}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, AT, BODY) == f"v1={expected}"


def test_signature_verifies_with_the_secret_within_the_tolerance() -> None:
    signature = sign(SECRET, AT, BODY)
    assert verify_signature(SECRET, body=BODY, timestamp=str(AT), signature=signature, now=AT)
    assert verify_signature(SECRET, body=BODY, timestamp=str(AT), signature=signature,
                            now=AT + 299)  # fmt: skip


@pytest.mark.parametrize(
    ("secret", "body", "timestamp", "now"),
    [
        ("whsec_wrong", BODY, str(AT), AT),  # another secret
        (SECRET, BODY + b" ", str(AT), AT),  # a body changed in transit
        (SECRET, BODY, str(AT + 1), AT),  # a timestamp changed in transit
        (SECRET, BODY, str(AT), AT + 301),  # too old: a replay
        (SECRET, BODY, "yesterday", AT),  # not a timestamp
        ("", BODY, str(AT), AT),  # no secret
    ],
)
def test_signature_fails(secret: str, body: bytes, timestamp: str, now: int) -> None:
    signature = sign(SECRET, AT, BODY)
    assert not verify_signature(secret, body=body, timestamp=timestamp, signature=signature,
                                now=now)  # fmt: skip


def test_any_of_several_signatures_may_match_during_a_secret_rotation() -> None:
    both = f"{sign('whsec_old', AT, BODY)}, {sign(SECRET, AT, BODY)}"
    assert verify_signature(SECRET, body=BODY, timestamp=str(AT), signature=both, now=AT)
    assert not verify_signature(SECRET, body=BODY, timestamp=str(AT), signature=None, now=AT)


def test_delivery_is_signed_with_id_event_and_timestamp_headers() -> None:
    seen: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    delivery = deliver("https://hooks.example/in", body={"order": 42}, event_id="job-1",
                       event="order.paid", secret=SECRET, timeout=5, clock=lambda: AT + 0.7,
                       transport=httpx.MockTransport(receiver))  # fmt: skip
    assert delivery.as_result() == {"status": 204, "event_id": "job-1", "timestamp": AT}
    [request] = seen
    headers = request.headers
    assert headers[ID_HEADER] == "job-1"
    assert headers[EVENT_HEADER] == "order.paid"
    assert headers[TIMESTAMP_HEADER] == str(AT)
    assert request.content == b'{"order":42}'
    assert verify_signature(SECRET, body=request.content, timestamp=headers[TIMESTAMP_HEADER],
                            signature=headers[SIGNATURE_HEADER], now=AT)  # fmt: skip


@pytest.mark.parametrize(
    ("status", "error"),
    [(408, TransientError), (429, TransientError), (500, TransientError), (410, PermanentError)],
)
def test_delivery_statuses(status: int, error: type[Exception]) -> None:
    def receiver(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text=f"no thanks, {request.headers[SIGNATURE_HEADER]}")

    with pytest.raises(error) as caught:
        deliver("https://hooks.example/in", body={}, event_id="j", secret=SECRET, timeout=5,
                transport=httpx.MockTransport(receiver))  # fmt: skip
    assert SECRET not in str(caught.value)


# -- declarations and payloads -----------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), queue_prefix="unit-")
    return create_app(settings, set_as_current=False)


@pytest.mark.parametrize(
    ("name", "queue", "alert"),
    [("ai.generate", "ai", False), ("webhooks.deliver", "webhooks", False),
     ("payments.charge", "payments", True)],
)  # fmt: skip
def test_job_types_are_declared_on_their_queues(app: Any, name: str, queue: str,
                                                alert: bool) -> None:  # fmt: skip
    task = app.tasks[name]
    assert task.family == queue
    assert task.alert_on_dead is alert
    assert task.time_limit > task.soft_time_limit


@pytest.mark.parametrize(
    ("name", "payload", "problem"),
    [
        ("ai.generate", {}, "exactly one of 'messages' and 'prompt'"),
        ("ai.generate", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
         "exactly one"),
        ("ai.generate", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ("ai.generate", {"prompt": "x", "temperature": 3}, "temperature"),
        ("ai.generate", {"prompt": "x", "base_url": "file:///etc/passwd"}, "http"),
        ("webhooks.deliver", {"url": "ftp://x.example/", "body": {}}, "url"),
        ("webhooks.deliver", {"url": "https://x.example/"}, "body"),
        ("payments.charge", {"amount": 0, "currency": "EUR", "customer": "c"}, "amount"),
        ("payments.charge", {"amount": 10.5, "currency": "EUR", "customer": "c"}, "amount"),
        ("payments.charge", {"amount": "10", "currency": "EUR", "customer": "c"}, "amount"),
        ("payments.charge", {"amount": 10, "currency": "EURO", "customer": "c"}, "currency"),
        ("payments.charge", {"amount": 10, "currency": "EUR", "customer": ""}, "customer"),
    ],
)  # fmt: skip
def test_invalid_payloads_are_refused_before_queueing(
    app: Any, name: str, payload: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidPayload, match=problem):
        app.tasks[name].validate_payload((), payload)


def test_currency_is_normalised_to_upper_case(app: Any) -> None:
    _, kwargs = app.tasks["payments.charge"].validate_payload(
        (), {"amount": 100, "currency": "eur", "customer": "cus_1"}
    )
    assert kwargs["currency"] == "EUR"


def test_monitors_see_payloads_without_their_secrets(app: Any) -> None:
    """What events, ``inspect`` and Flower show of a payload is redacted like the history."""
    task = app.tasks["ai.generate"]
    job_id = task.apply_async(kwargs={"prompt": "hi", "api_key": "sk-live-0123"}).id
    folder = app.settings.broker_folders()["queue"]
    [message] = [m for p in folder.iterdir() if (m := json.loads(p.read_text()))
                 ["headers"]["id"] == job_id]  # fmt: skip
    assert "sk-live-0123" not in message["headers"]["kwargsrepr"]
    assert "'api_key': '[redacted]'" in message["headers"]["kwargsrepr"]
    assert "'prompt': 'hi'" in message["headers"]["kwargsrepr"]


# -- payments idempotency key ------------------------------------------------------------------
def context(**fields: Any) -> JobContext:
    values: dict[str, Any] = {
        "id": "6f1c",
        "name": "payments.charge",
        "attempt": 1,
        "max_retries": 5,
        "queue": "payments",
        "settings": Settings(),
    }
    values.update(fields)
    return JobContext(**values)


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({}, "tasks-platform-6f1c"),
        ({"attempt": 4}, "tasks-platform-6f1c"),
        ({"idempotency_key": "order-7"}, "order-7"),
        ({"idempotency_key": "order-7", "tenant": "acme"}, "acme:order-7"),
    ],
)
def test_idempotency_key_is_the_jobs_key_else_derived_from_its_id(
    fields: dict[str, Any], key: str
) -> None:
    assert idempotency_key(context(**fields)) == key


def test_charge_without_configuration_is_permanent(app: Any) -> None:
    payload = Charge(amount=100, currency="EUR", customer="cus_1")
    with pytest.raises(PermanentError, match="TASKS_PAYMENTS_BASE_URL"):
        charge.body(context(), payload)


# -- redaction of ai payloads and results ------------------------------------------------------
def test_token_counts_are_kept_while_keys_and_tokens_are_redacted() -> None:
    payload = {"prompt": "hi", "max_tokens": 64, "api_key": "sk-1", "access_token": "t",
               "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
               "tokens": ["device-token-1"]}  # fmt: skip
    assert redact(payload) == {
        "prompt": "hi",
        "max_tokens": 64,
        "api_key": REDACTED,
        "access_token": REDACTED,
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        "tokens": REDACTED,
    }
