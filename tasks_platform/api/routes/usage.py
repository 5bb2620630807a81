"""Usage metering: jobs, attempts, run time and LLM tokens per day, tenant and job type."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Query

from tasks_platform.api import schemas
from tasks_platform.api.auth import JobReader
from tasks_platform.api.context import Context
from tasks_platform.api.errors import ApiError
from tasks_platform.api.roles import Role
from tasks_platform.stats.usage import MAX_DAYS, check_range, last_days

router = APIRouter(tags=["usage"])


@router.get("/usage")
def usage(
    caller: JobReader,
    context: Context,
    tenant: Annotated[
        str | None, Query(pattern=schemas.TENANT, description="Only this tenant's jobs.")
    ] = None,
    job: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Only this job type.")
    ] = None,
    days: Annotated[
        int | None,
        Query(ge=1, le=MAX_DAYS, description="The last N UTC days, today included (default 7)."),
    ] = None,
    since: Annotated[date | None, Query(description="First UTC day (with until).")] = None,
    until: Annotated[date | None, Query(description="Last UTC day (default: today).")] = None,
) -> schemas.UsageResponse:
    """Per UTC day, tenant and job type: jobs that ended, how, their attempts, run time and
    LLM tokens. A tenant token sees its own tenant's usage only, whatever it asks for."""
    if days is not None and (since is not None or until is not None):
        raise ApiError("give either days, or since/until", code="invalid_range")
    first, last = last_days(days or 7)
    first, last = since or first, until or last
    try:
        check_range(first, last)
    except ValueError as exc:
        raise ApiError(str(exc), code="invalid_range") from None
    if caller.role is Role.TENANT:
        tenant = caller.tenant or ""  # a tenant token without a tenant sees nothing
    rows = context.stats.usage(since=first, until=last, tenant=tenant, job=job)
    return schemas.UsageResponse(
        since=first,
        until=last,
        rows=[schemas.UsageRow.model_validate(row.as_dict()) for row in rows],
    )
