"""Charging a customer through a payment provider's HTTP API, idempotently.

``POST {base_url}/charges`` with a JSON body ``{"amount", "currency", "customer",
"description"}``, the provider key as ``Authorization: Bearer`` and an ``Idempotency-Key``
header. The key is the whole safety of a retried charge: a provider that already accepted a
charge under a key answers a repeat with that same charge (as Stripe does) instead of charging
twice, so the caller must send the same key for every attempt of one payment.

5xx, 429 (with ``Retry-After``), timeouts and connection failures are transient. 408 and 409
are transient too: the provider did not process the request, or is still processing another
request with the same key. Any other 4xx (card declined, invalid customer, bad key) is
permanent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from tasks_platform.domain.http import json_object, post_json

IDEMPOTENCY_HEADER = "Idempotency-Key"
RETRY_STATUSES = frozenset({408, 409})


@dataclass(frozen=True)
class Charge:
    """A charge the provider accepted."""

    id: str | None
    status: str | None
    amount: int
    currency: str
    customer: str
    idempotency_key: str

    def as_result(self) -> dict[str, Any]:
        return {
            "charge_id": self.id,
            "status": self.status,
            "amount": self.amount,
            "currency": self.currency,
            "customer": self.customer,
            "idempotency_key": self.idempotency_key,
        }


def charge(
    *,
    base_url: str,
    api_key: str,
    idempotency_key: str,
    amount: int,
    currency: str,
    customer: str,
    description: str | None,
    timeout: float,
    transport: httpx.BaseTransport | None = None,
) -> Charge:
    """Charge ``amount`` (minor units) of ``currency`` to ``customer``, once per key."""
    body: dict[str, Any] = {"amount": amount, "currency": currency, "customer": customer}
    if description is not None:
        body["description"] = description
    headers = {
        "Accept": "application/json",
        "Authorization": f"Bearer {api_key}",
        IDEMPOTENCY_HEADER: idempotency_key,
    }
    secrets = [api_key]
    response = post_json(
        f"{base_url.rstrip('/')}/charges",
        content=json.dumps(body).encode(),
        headers=headers,
        timeout=timeout,
        retry_statuses=RETRY_STATUSES,
        secrets=secrets,
        transport=transport,
    )
    answer = json_object(response, secrets=secrets)
    charge_id, status = answer.get("id"), answer.get("status")
    return Charge(
        id=str(charge_id) if charge_id is not None else None,
        status=str(status) if status is not None else None,
        amount=amount,
        currency=currency,
        customer=customer,
        idempotency_key=idempotency_key,
    )
