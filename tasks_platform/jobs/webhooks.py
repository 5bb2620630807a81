"""The ``webhooks`` family: ``webhooks.deliver`` POSTs a signed JSON event to a URL.

Headers and how a receiver verifies them: :mod:`tasks_platform.domain.webhooks`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks_platform.domain.http import check_http_url
from tasks_platform.domain.webhooks import deliver as deliver_signed
from tasks_platform.errors import PermanentError
from tasks_platform.jobs.declaration import JobContext, job
from tasks_platform.jobs.retry import RetryPolicy

SOFT_TIME_LIMIT = 60.0
TIME_LIMIT = 75.0
_MARGIN = 5.0


class Deliver(BaseModel):
    """Where to, what, and (optionally) this job's own signing secret."""

    model_config = ConfigDict(extra="forbid")

    url: str
    body: Any
    event: str | None = Field(default=None, min_length=1, max_length=200)
    #: the signing secret for this job; else TASKS_WEBHOOK_SECRET (kept out of the history)
    secret: str | None = Field(default=None, min_length=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value)


@job(
    "webhooks.deliver",
    queue="webhooks",
    schema=Deliver,
    retry=RetryPolicy(max_retries=10),
    soft_time_limit=SOFT_TIME_LIMIT,
    time_limit=TIME_LIMIT,
    bind=True,
    sensitive=("secret",),
)
def deliver(context: JobContext, payload: Deliver) -> dict[str, object]:
    """Deliver once, signed afresh; 5xx/408/429/timeouts retried, other 4xx dead-lettered."""
    settings = context.settings
    configured = settings.webhook_secret
    secret = payload.secret or (configured.get_secret_value() if configured else None)
    if not secret:
        raise PermanentError(
            "webhooks.deliver has no signing secret: give 'secret' in the payload or set "
            "TASKS_WEBHOOK_SECRET"
        )
    delivery = deliver_signed(
        payload.url,
        body=payload.body,
        event_id=context.id,
        event=payload.event,
        secret=secret,
        timeout=min(settings.webhook_timeout, SOFT_TIME_LIMIT - _MARGIN),
    )
    return delivery.as_result()
