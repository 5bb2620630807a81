"""The HTTP layer of the job types: responses and failures mapped to job errors (no server)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from tasks_platform.domain.ai import complete, parse_completion
from tasks_platform.domain.http import (
    check_http_url,
    describe_url,
    error_for_exception,
    error_for_response,
    parse_retry_after,
    post_json,
    scrub,
)
from tasks_platform.domain.payments import charge
from tasks_platform.errors import PermanentError, TransientError

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
KEY = "sk-test-7f3a9c1e5b"
URL = "https://api.example.com/v1/chat/completions"


def answer(status: int, *, headers: dict[str, str] | None = None, body: str = "") -> httpx.Response:
    request = httpx.Request("POST", URL, headers={"Authorization": f"Bearer {KEY}"})
    return httpx.Response(status, headers=headers, text=body, request=request)


def transport(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


# -- Retry-After -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("7", 7.0), (" 120 ", 120.0), ("1.5", 1.5), ("86400", 86400.0)],
)
def test_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_http_date_counts_from_now() -> None:
    later = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert later.endswith("GMT")
    assert parse_retry_after(later, now=NOW) == 90.0


def test_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "  ", "-3", "soon", "nan", "inf", "12 parsecs"])
def test_retry_after_that_means_nothing_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


# -- responses -------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_success_is_no_error(status: int) -> None:
    assert error_for_response(answer(status)) is None


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_rate_limits_and_server_errors_are_transient(status: int) -> None:
    error = error_for_response(answer(status, headers={"Retry-After": "12"}))
    assert isinstance(error, TransientError)
    assert error.retry_after == 12.0
    assert f"answered {status}" in str(error)


def test_transient_without_retry_after_leaves_the_delay_to_the_backoff() -> None:
    error = error_for_response(answer(503))
    assert isinstance(error, TransientError)
    assert error.retry_after is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 409, 410, 422, 301])
def test_other_statuses_are_permanent(status: int) -> None:
    assert isinstance(error_for_response(answer(status)), PermanentError)


def test_a_job_type_may_retry_more_statuses() -> None:
    error = error_for_response(answer(408, headers={"Retry-After": "3"}), retry_statuses={408})
    assert isinstance(error, TransientError)
    assert error.retry_after == 3.0


def test_error_message_names_the_call_and_the_providers_message() -> None:
    body = '{"error": {"message": "The model `gpt-9` does not exist", "type": "invalid"}}'
    error = error_for_response(answer(404, body=body))
    assert str(error) == (
        "POST https://api.example.com/v1/chat/completions answered 404 Not Found: "
        "The model `gpt-9` does not exist"
    )


def test_error_message_keeps_a_bounded_excerpt_of_a_plain_body() -> None:
    error = error_for_response(answer(500, body="<html>" + "x" * 5000))
    assert 0 < len(str(error)) < 500
    assert str(error).endswith("...")


def test_secrets_echoed_by_the_server_are_redacted() -> None:
    body = f'{{"error": "invalid key {KEY}"}}'
    error = error_for_response(answer(401, body=body), secrets=[KEY])
    assert KEY not in str(error)
    assert "invalid key [redacted]" in str(error)


def test_url_described_without_user_info_or_query() -> None:
    url = "https://user:pa55@hooks.example.com:8443/in/abc?token=s3cret#frag"
    assert describe_url(url) == "https://hooks.example.com:8443/in/abc"


def test_scrub_replaces_longer_secrets_first_and_ignores_empty_ones() -> None:
    assert scrub("k=abc123 k2=abc", ["abc", "abc123", ""]) == "k=[redacted] k2=[redacted]"


# -- transport failures ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectTimeout("timed out"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("reset"),
    ],
)
def test_timeouts_and_connection_failures_are_transient(exc: httpx.HTTPError) -> None:
    error = error_for_exception(exc, method="POST", url="http://user:pw@h.example/x?k=1")
    assert isinstance(error, TransientError)
    assert error.retry_after is None
    assert str(error).startswith("POST http://h.example/x ")
    assert "pw" not in str(error)
    assert "k=1" not in str(error)


def test_unsupported_scheme_is_permanent() -> None:
    error = error_for_exception(httpx.UnsupportedProtocol("ftp"), method="POST", url="ftp://h/x")
    assert isinstance(error, PermanentError)


def test_post_json_sends_the_body_and_maps_a_refused_connection() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(TransientError, match="Connection refused"):
        post_json(URL, content=b"{}", headers={}, timeout=1, transport=transport(refuse))


def test_post_json_does_not_follow_redirects() -> None:
    def redirect(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": "https://elsewhere.example/"})

    with pytest.raises(PermanentError, match="answered 307"):
        post_json(URL, content=b"{}", headers={}, timeout=1, transport=transport(redirect))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("https://api.example.com/v1", True),
        ("http://127.0.0.1:8080", True),
        ("ftp://example.com", False),
        ("example.com/hook", False),
        ("https://", False),
    ],
)
def test_check_http_url(value: str, ok: bool) -> None:
    if ok:
        assert check_http_url(value) == value
    else:
        with pytest.raises(ValueError, match="URL"):
            check_http_url(value)


# -- ai ----------------------------------------------------------------------------------------
COMPLETION = {
    "id": "chatcmpl-1",
    "model": "llama3.2:1b",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}


def test_completion_result_has_text_model_finish_reason_and_usage() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=COMPLETION)

    completion = complete(
        base_url="http://127.0.0.1:11434/v1/",
        model="llama3.2:1b",
        messages=[{"role": "user", "content": "Say hi"}],
        api_key=KEY,
        timeout=5,
        temperature=0.2,
        max_tokens=16,
        transport=transport(server),
    )
    assert completion.as_result() == {
        "text": "Hi!",
        "model": "llama3.2:1b",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    [request] = seen
    assert str(request.url) == "http://127.0.0.1:11434/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert b'"max_tokens": 16' in request.content
    assert b'"stream": false' in request.content


def test_completion_without_key_sends_no_authorization() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=COMPLETION)

    complete(base_url="http://127.0.0.1:1/v1", model="m", messages=[], api_key=None, timeout=5,
             transport=transport(server))  # fmt: skip
    assert "Authorization" not in seen[0].headers


def test_completion_without_usage_counts_zero_tokens() -> None:
    body = {"choices": [{"message": {"content": None}, "finish_reason": "length"}]}
    result = parse_completion(body, model="m").as_result()
    assert result == {
        "text": "",
        "model": "m",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def test_completion_without_choices_is_permanent() -> None:
    with pytest.raises(PermanentError, match="without choices"):
        parse_completion({"object": "list"}, model="m", url=URL)


def test_completion_answer_that_is_not_json_is_permanent() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>a login page</html>")

    with pytest.raises(PermanentError, match="not JSON"):
        complete(base_url="http://h.example/v1", model="m", messages=[], api_key=KEY, timeout=5,
                 transport=transport(server))  # fmt: skip


def test_wrong_api_key_is_permanent_and_not_repeated() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        return httpx.Response(401, json={"error": {"message": f"Incorrect API key: {key}"}})

    with pytest.raises(PermanentError) as caught:
        complete(base_url="http://h.example/v1", model="m", messages=[], api_key=KEY, timeout=5,
                 transport=transport(server))  # fmt: skip
    assert KEY not in str(caught.value)
    assert "Incorrect API key: [redacted]" in str(caught.value)


# -- payments ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "error"),
    [(402, PermanentError), (409, TransientError), (408, TransientError), (503, TransientError)],
)
def test_payment_statuses(status: int, error: type[Exception]) -> None:
    def provider(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "Your card was declined."}})

    with pytest.raises(error):
        charge(base_url="http://pay.example", api_key=KEY, idempotency_key="k1", amount=500,
               currency="EUR", customer="cus_1", description=None, timeout=5,
               transport=transport(provider))  # fmt: skip


def test_payment_sends_key_amount_and_bearer_and_returns_the_charge() -> None:
    seen: list[httpx.Request] = []

    def provider(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"id": "ch_1", "status": "succeeded"})

    made = charge(base_url="http://pay.example/v1/", api_key=KEY, idempotency_key="order-7",
                  amount=1250, currency="EUR", customer="cus_1", description="order 7",
                  timeout=5, transport=transport(provider))  # fmt: skip
    assert made.as_result() == {
        "charge_id": "ch_1",
        "status": "succeeded",
        "amount": 1250,
        "currency": "EUR",
        "customer": "cus_1",
        "idempotency_key": "order-7",
    }
    [request] = seen
    assert str(request.url) == "http://pay.example/v1/charges"
    assert request.headers["Idempotency-Key"] == "order-7"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
