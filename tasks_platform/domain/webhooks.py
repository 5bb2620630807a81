"""Signed webhook deliveries, and the check a receiver runs on them.

Each delivery is a ``POST`` of a JSON body with these headers:

``Webhook-Id``
    the event id (the job id): the same on every attempt, so a receiver can drop duplicates.
``Webhook-Timestamp``
    Unix seconds when this attempt was signed (every attempt signs afresh).
``Webhook-Signature``
    ``v1=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with the shared secret>``; during a
    secret rotation a receiver may be sent several, comma-separated: any one may match.
``Webhook-Event``
    the event type, when the sender gave one.

A receiver verifies with :func:`verify_signature` (or the same few lines in any language): it
computes the HMAC over the timestamp, a dot and the *raw* body bytes as received, compares in
constant time, and refuses timestamps older than a tolerance (5 minutes) to stop replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tasks_platform.domain.http import post_json

ID_HEADER = "Webhook-Id"
TIMESTAMP_HEADER = "Webhook-Timestamp"
SIGNATURE_HEADER = "Webhook-Signature"
EVENT_HEADER = "Webhook-Event"
SCHEME = "v1"
#: how old a signed timestamp may be (seconds) before a receiver refuses it
DEFAULT_TOLERANCE = 300.0
#: statuses below 500 that are retried besides 429: the receiver timed out reading the request
RETRY_STATUSES = frozenset({408})


@dataclass(frozen=True)
class Delivery:
    """An accepted delivery: the receiver's status and what identified the attempt."""

    status: int
    event_id: str
    timestamp: int

    def as_result(self) -> dict[str, Any]:
        return {"status": self.status, "event_id": self.event_id, "timestamp": self.timestamp}


def encode_body(body: Any) -> bytes:
    """The exact bytes sent (and signed) for a JSON ``body``."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``Webhook-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={digest.hexdigest()}"


def verify_signature(
    secret: str,
    *,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """True when ``signature`` is ours for the raw ``body`` and ``timestamp`` is recent enough.

    ``timestamp`` and ``signature`` are the ``Webhook-Timestamp`` and ``Webhook-Signature``
    header values as received; ``tolerance`` bounds the age (and the clock skew) in seconds.
    """
    if not secret or not timestamp or not signature:
        return False
    try:
        signed_at = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - signed_at) > tolerance:
        return False
    expected = sign(secret, signed_at, body)
    offered = [part.strip() for part in signature.split(",")]
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)


def deliver(
    url: str,
    *,
    body: Any,
    event_id: str,
    secret: str,
    timeout: float,
    event: str | None = None,
    clock: Callable[[], float] = time.time,
    transport: httpx.BaseTransport | None = None,
) -> Delivery:
    """POST ``body`` to ``url``, signed now; TransientError/PermanentError when refused.

    5xx, 408, 429 (with ``Retry-After``), timeouts and connection failures are transient; any
    other 4xx is permanent. Redirects are not followed.
    """
    content = encode_body(body)
    timestamp = int(clock())
    headers = {
        ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, content),
    }
    if event:
        headers[EVENT_HEADER] = event
    response = post_json(
        url,
        content=content,
        headers=headers,
        timeout=timeout,
        retry_statuses=RETRY_STATUSES,
        secrets=[secret],
        transport=transport,
    )
    return Delivery(status=response.status_code, event_id=event_id, timestamp=timestamp)
