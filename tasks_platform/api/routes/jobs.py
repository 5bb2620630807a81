"""Jobs: submit, list, show (status and progress), cancel, retry."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response, status

from tasks_platform.api import schemas
from tasks_platform.api.auth import Canceller, JobReader, Retrier, Submitter, visible
from tasks_platform.api.context import Context
from tasks_platform.api.errors import ApiError, Forbidden
from tasks_platform.api.roles import Role
from tasks_platform.api.tokens import Principal
from tasks_platform.errors import InvalidPayload
from tasks_platform.history.models import Base, JobState
from tasks_platform.history.repository import DEFAULT_LIMIT, MAX_LIMIT, JobRepository, row_as_dict

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, Path(min_length=1, max_length=64, description="The job id.")]
OptionalAction = Annotated[schemas.ActionRequest | None, Body()]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": schemas.SubmitResponse, "description": "An earlier job's id."}},
)
def submit(
    request: schemas.SubmitRequest, caller: Submitter, context: Context, response: Response
) -> schemas.SubmitResponse:
    """Validate the payload against the job type's schema and queue the job.

    201 with the new job's id; 200 with the first job's id when the idempotency key was used
    before by the same tenant (nothing is queued then). A tenant token submits for its own
    tenant, whatever the body says.
    """
    tenant = request.tenant
    if caller.role is Role.TENANT:
        if tenant is not None and tenant != caller.tenant:
            raise Forbidden("a tenant token submits jobs for its own tenant only")
        tenant = caller.tenant
    submitted = context.submissions.submit(
        request.name,
        request.payload,
        priority=request.priority,
        tenant=tenant,
        idempotency_key=request.idempotency_key,
    )
    if not submitted.created:
        response.status_code = status.HTTP_200_OK
    return schemas.SubmitResponse(id=submitted.id, created=submitted.created)


@router.get("")
def list_jobs(
    caller: JobReader,
    context: Context,
    state: Annotated[list[JobState] | None, Query(description="Repeatable.")] = None,
    queue: Annotated[str | None, Query(max_length=200)] = None,
    name: Annotated[str | None, Query(max_length=200, description="The job type.")] = None,
    tenant: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[datetime | None, Query(description="Queued at or after (ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Queued before (ISO 8601).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=1000, description="A next_cursor.")] = None,
) -> schemas.JobPage:
    """Jobs matching every filter given, newest first, a page at a time.

    A tenant token sees its own tenant's jobs only (another tenant's name matches nothing).
    """
    if caller.role is Role.TENANT:
        if tenant is not None and tenant != caller.tenant:
            return schemas.JobPage(items=[], next_cursor=None)
        tenant = caller.tenant
    with context.sessions() as session:
        try:
            page = JobRepository(session).list(
                states=state, queue=queue, name=name, tenant=tenant,
                since=since, until=until, limit=limit, after=cursor,
            )  # fmt: skip
        except InvalidPayload as exc:
            raise ApiError(str(exc), code="invalid_cursor") from exc
        items = [_job(row) for row in page.items]
    return schemas.JobPage(items=items, next_cursor=page.next_cursor)


@router.get("/{job_id}")
def show_job(job_id: JobId, caller: JobReader, context: Context) -> schemas.JobDetail:
    """One job's status, and every transition it went through (its progress)."""
    with context.sessions() as session:
        found = JobRepository(session).get(job_id)
        job = visible(caller, found[0] if found else None, job_id)
        events = found[1] if found else []
        return schemas.JobDetail(
            job=_job(job),
            events=[schemas.JobEvent.model_validate(row_as_dict(e)) for e in events],
        )


@router.post("/{job_id}/cancel")
def cancel_job(
    job_id: JobId, caller: Canceller, context: Context, body: OptionalAction = None
) -> schemas.CancelResponse:
    """Cancel a job: a queued one never runs; a running one is terminated or asked to stop."""
    _check_owner(context, caller, job_id)
    reason = body.reason if body else None
    outcome = context.control.cancel(job_id, actor=caller.actor, reason=reason)
    return schemas.CancelResponse(id=job_id, outcome=outcome)


@router.post("/{job_id}/retry", status_code=status.HTTP_201_CREATED)
def retry_job(
    job_id: JobId, caller: Retrier, context: Context, body: OptionalAction = None
) -> schemas.RetryResponse:
    """Queue a failed, dead or cancelled job again as a new job linked to it (retry_of)."""
    reason = body.reason if body else None
    new_id = context.control.retry(job_id, actor=caller.actor, reason=reason)
    return schemas.RetryResponse(id=job_id, new_id=new_id)


def _check_owner(context: Context, caller: Principal, job_id: str) -> None:
    if caller.role is not Role.TENANT:
        return  # the others act on any job; Control says if it does not exist
    with context.sessions() as session:
        found = JobRepository(session).get(job_id)
        visible(caller, found[0] if found else None, job_id)


def _job(row: Base) -> schemas.Job:
    values: dict[str, Any] = row_as_dict(row)
    values["payload"] = values.pop("kwargs", None)
    return schemas.Job.model_validate(values)
