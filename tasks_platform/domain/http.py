"""Calling HTTP APIs from jobs: one place that turns responses and failures into job errors.

The mapping every HTTP job type shares:

==================================================  ===========================================
what happened                                       error
==================================================  ===========================================
timeout, connection refused/reset, protocol error   ``TransientError``
``429``, any ``5xx``, and the statuses a job type   ``TransientError(retry_after=...)`` with the
lists as retryable too (``408`` for webhooks ...)   response's ``Retry-After``, if any
any other status that is not ``2xx``                ``PermanentError``
==================================================  ===========================================

``Retry-After`` is read in both of its forms: delta-seconds (``120``) and an HTTP-date
(``Wed, 21 Oct 2026 07:28:00 GMT``). Messages name the method, the host and path of the URL
(never its query or user info) and the status with a short excerpt of the error body; every
secret the caller names (API keys, signing secrets) is replaced by ``[redacted]`` wherever it
would appear. Request headers (``Authorization`` ...) are never part of a message.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from tasks_platform.errors import JobError, PermanentError, TransientError

#: what replaces a secret in an error message
REDACTED = "[redacted]"
#: statuses below 500 that are retried whatever the job type (rate limiting)
ALWAYS_RETRYABLE = frozenset({429})
#: the longest error-body excerpt kept in a message
_EXCERPT = 300
_SPACES = re.compile(r"\s+")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None when there is none or it is bad.

    Delta-seconds must be a non-negative number; an HTTP-date in the past gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return _seconds_until(text, now)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _seconds_until(text: str, now: datetime | None) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def scrub(text: str, secrets: Collection[str]) -> str:
    """``text`` with every (non-empty) secret replaced by ``[redacted]``."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def describe_url(url: httpx.URL | str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no user info, no query, no fragment."""
    parsed = httpx.URL(str(url))
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def error_for_response(
    response: httpx.Response,
    *,
    retry_statuses: Collection[int] = (),
    secrets: Collection[str] = (),
) -> JobError | None:
    """The error a non-2xx ``response`` stands for (None for a 2xx)."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    request = response.request
    where = f"{request.method} {describe_url(request.url)}"
    reason = response.reason_phrase or "error"
    detail = _error_detail(response)
    message = scrub(f"{where} answered {status} {reason}{detail}", secrets)
    if status >= 500 or status in ALWAYS_RETRYABLE or status in retry_statuses:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            message += f" (Retry-After {retry_after:g}s)"
        return TransientError(message, retry_after=retry_after)
    return PermanentError(message)


def error_for_exception(
    exc: httpx.HTTPError, *, method: str, url: str, secrets: Collection[str] = ()
) -> JobError:
    """The error a failed request stands for: transport failures are worth retrying."""
    where = f"{method} {describe_url(url)}"
    kind = type(exc).__name__
    text = str(exc) or kind
    if isinstance(exc, httpx.TimeoutException):
        return TransientError(scrub(f"{where} timed out ({kind}: {text})", secrets))
    if isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.UnsupportedProtocol):
        return TransientError(scrub(f"{where} failed ({kind}: {text})", secrets))
    return PermanentError(scrub(f"{where} cannot be requested ({kind}: {text})", secrets))


def post_json(
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    timeout: float,
    retry_statuses: Collection[int] = (),
    secrets: Collection[str] = (),
    transport: httpx.BaseTransport | None = None,
) -> httpx.Response:
    """POST the JSON ``content`` to ``url``; the 2xx response, or the job error it stands for.

    Redirects are not followed: a POST that is redirected is reported, not silently resent.
    """
    all_headers = {"Content-Type": "application/json", "User-Agent": "tasks-platform", **headers}
    try:
        with httpx.Client(timeout=timeout, transport=transport) as client:
            response = client.post(url, content=content, headers=all_headers)
    except httpx.InvalidURL as exc:
        raise PermanentError(scrub(f"POST to an invalid URL ({exc})", secrets)) from None
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, method="POST", url=url, secrets=secrets) from None
    error = error_for_response(response, retry_statuses=retry_statuses, secrets=secrets)
    if error is not None:
        raise error
    return response


def json_object(response: httpx.Response, *, secrets: Collection[str] = ()) -> dict[str, Any]:
    """The JSON object of a 2xx ``response``; PermanentError if it is anything else."""
    request = response.request
    where = f"{request.method} {describe_url(request.url)}"
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        excerpt = _excerpt(response.text)
        message = f"{where} answered {response.status_code} with a body that is not JSON: "
        raise PermanentError(scrub(message + repr(excerpt), secrets)) from None
    if not isinstance(body, dict):
        raise PermanentError(f"{where} answered with JSON that is not an object")
    return body


def _error_detail(response: httpx.Response) -> str:
    """``: <the provider's error message>`` from the body, if it has one, bounded."""
    try:
        text = response.text
    except (UnicodeDecodeError, LookupError):
        return ""
    if not text.strip():
        return ""
    try:
        body = json.loads(text)
    except ValueError:
        return f": {_excerpt(text)}"
    message = _message_of(body)
    return f": {_excerpt(message if message is not None else text)}"


def _message_of(body: Any) -> str | None:
    """The message of the usual error shapes: {"error": {"message"}}, {"error"}, {"message"}."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    for key in ("error", "message", "detail"):
        if isinstance(body.get(key), str):
            return str(body[key])
    return None


def _excerpt(text: str) -> str:
    flat = _SPACES.sub(" ", text).strip()
    return flat if len(flat) <= _EXCERPT else flat[: _EXCERPT - 3] + "..."


def check_http_url(value: str) -> str:
    """``value`` if it is an absolute ``http``/``https`` URL, else ValueError (for schemas).

    The message never repeats the URL: it may carry credentials.
    """
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        raise ValueError("is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an absolute http:// or https:// URL")
    return value
