"""Errors of the admin API, and the one JSON shape every error response has.

Every error answers ``{"error": {"code": "...", "message": "..."}}`` with a stable ``code``
(request validation errors add ``details``: where and what)::

    ApiError (PlatformError)           status  code
     ├── Unauthorized                  401     unauthorized        no or malformed bearer token
     │    └── InvalidToken             401     invalid_token       unknown, expired or revoked
     ├── Forbidden                     403     forbidden           the role may not do this
     ├── NotFound                      404     not_found           (job_not_found, route ...)
     │    └── TokenNotFound            404     token_not_found
     └── Conflict                      409     conflict            (idempotency_conflict ...)

    answered, never raised:            413     payload_too_large   body over the size limit
                                       422     invalid_request     a request that fails validation
                                       503     broker_unavailable, publish_not_confirmed,
                                               database_unavailable,
                                               limits_unavailable (tenant limits' Redis)

The platform's own errors map to a status in :data:`PLATFORM_ERRORS` (an invalid payload is a
422, an unknown queue a 404 ...); :mod:`tasks_platform.api.handlers` turns every error into a
response. Invalid input is a 4xx, never a 500: a 500 (``internal_error``) means a bug, and is
logged with its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks_platform import errors
from tasks_platform.errors import PlatformError


class ApiError(PlatformError):
    """An error answered as JSON with ``status`` and a stable ``code``."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class InvalidToken(Unauthorized):
    code = "invalid_token"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class TokenNotFound(NotFound):
    code = "token_not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


#: the platform's errors as (status, code); the first class an error is an instance of wins
PLATFORM_ERRORS: tuple[tuple[type[PlatformError], int, str], ...] = (
    (errors.InvalidPayload, 422, "invalid_payload"),
    (errors.UnknownJob, 422, "unknown_job"),
    (errors.UnknownQueue, 404, "queue_not_found"),
    (errors.DeadLetterGroupNotFound, 404, "dead_letter_group_not_found"),
    (errors.DeadLetterNotFound, 404, "dead_letter_not_found"),
    (errors.JobNotFound, 404, "job_not_found"),
    (errors.JobFinished, 409, "job_finished"),
    (errors.JobNotRetryable, 409, "job_not_retryable"),
    (errors.LimitsUnavailable, 503, "limits_unavailable"),  # nothing queued: try again
    (errors.PublishNotConfirmed, 503, "publish_not_confirmed"),  # may be queued: the key again
    (errors.BrokerUnavailable, 503, "broker_unavailable"),  # nothing queued: try again
    (errors.HistoryUnavailable, 503, "database_unavailable"),  # nothing queued: try again
)


def error_body(code: str, message: str, details: Sequence[Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = list(details)
    return {"error": body}
