"""The ``payments`` family: ``payments.charge`` charges a customer through the provider's API.

Every attempt of one job sends the same ``Idempotency-Key`` (:func:`idempotency_key`), so a
retry or a redelivery after a crash never charges twice. A payment that cannot be made is
dead-lettered *and* raises an alert (``alert_on_dead``): it is never silently dropped.
Submitting one goes through the outbox (``outbox=True``): ``charge.delay(...)`` commits the job
to the database first and the relay publishes it, so a broker outage never loses a payment;
``charge.apply_in(session, ...)`` ties it to the caller's own transaction.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from tasks_platform.domain.payments import charge as charge_customer
from tasks_platform.errors import PermanentError
from tasks_platform.jobs.declaration import JobContext, job
from tasks_platform.jobs.retry import RetryPolicy

SOFT_TIME_LIMIT = 120.0
TIME_LIMIT = 150.0
_MARGIN = 10.0
#: prefix of the keys derived from job ids
KEY_PREFIX = "tasks-platform-"


class Charge(BaseModel):
    """An amount in minor units (cents), an ISO 4217 currency, who pays, and what for."""

    model_config = ConfigDict(extra="forbid")

    amount: StrictInt = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Za-z]{3}$")
    customer: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=1000)

    @field_validator("currency")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()


def idempotency_key(context: JobContext) -> str:
    """The provider's ``Idempotency-Key``: the same for every attempt of one job.

    The key the job was submitted with (prefixed by its tenant, as keys are scoped per tenant),
    else one derived from the job id, which stays the same across retries and redeliveries.
    """
    if context.idempotency_key:
        if context.tenant:
            return f"{context.tenant}:{context.idempotency_key}"
        return context.idempotency_key
    return f"{KEY_PREFIX}{context.id}"


@job(
    "payments.charge",
    queue="payments",
    schema=Charge,
    retry=RetryPolicy(max_retries=5),
    soft_time_limit=SOFT_TIME_LIMIT,
    time_limit=TIME_LIMIT,
    bind=True,
    alert_on_dead=True,
    outbox=True,  # committed before apply_async returns: a payment survives a broker outage
)
def charge(context: JobContext, payload: Charge) -> dict[str, object]:
    """Charge once per job; 5xx/408/409/429/timeouts retried, other 4xx (declined) are not."""
    settings = context.settings
    if not settings.payments_base_url or settings.payments_api_key is None:
        raise PermanentError(
            "payments.charge is not configured: set TASKS_PAYMENTS_BASE_URL and "
            "TASKS_PAYMENTS_API_KEY"
        )
    made = charge_customer(
        base_url=settings.payments_base_url,
        api_key=settings.payments_api_key.get_secret_value(),
        idempotency_key=idempotency_key(context),
        amount=payload.amount,
        currency=payload.currency,
        customer=payload.customer,
        description=payload.description,
        timeout=min(settings.payments_timeout, SOFT_TIME_LIMIT - _MARGIN),
    )
    return made.as_result()
