"""Who is calling, and may they: bearer-token authentication and role checks.

``Authorization: Bearer <secret>``. A missing, malformed, unknown, expired or revoked token is
a 401 (``unauthorized`` / ``invalid_token``); a valid token whose role may not do what it asks
is a 403 (``forbidden``). Routes declare what they need with the ``Caller`` annotations below.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tasks_platform.api.context import Context
from tasks_platform.api.errors import Forbidden, InvalidToken, NotFound, Unauthorized
from tasks_platform.api.roles import Permission, Role, allows
from tasks_platform.api.tokens import Principal, authenticate
from tasks_platform.history.models import Job

#: longer "secrets" are refused before any lookup
SECRET_MAX = 512

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="A token made with `tasks-platform token create`.",
)


def authenticated(
    context: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    secret = credentials.credentials.strip()
    if not secret or len(secret) > SECRET_MAX:
        raise InvalidToken("invalid API token")
    with context.sessions() as session:
        caller = authenticate(session, secret)
        session.commit()  # last_used_at
    return caller


def require(permission: Permission) -> Any:
    """A dependency giving the caller if their role has ``permission``, else 403."""

    def dependency(caller: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if not allows(caller.role, permission):
            raise Forbidden(
                f"a {caller.role.value} token may not {permission.value.replace('_', ' ')}"
            )
        return caller

    return Depends(dependency)


Monitor = Annotated[Principal, require(Permission.MONITOR)]
JobReader = Annotated[Principal, require(Permission.READ_JOBS)]
Submitter = Annotated[Principal, require(Permission.SUBMIT)]
Canceller = Annotated[Principal, require(Permission.CANCEL)]
Retrier = Annotated[Principal, require(Permission.RETRY)]
Pauser = Annotated[Principal, require(Permission.PAUSE)]
Replayer = Annotated[Principal, require(Permission.REPLAY)]
Purger = Annotated[Principal, require(Permission.PURGE)]
Cleaner = Annotated[Principal, require(Permission.CLEAN)]


def visible(caller: Principal, job: Job | None, job_id: str) -> Job:
    """``job`` if the caller may see it; else the same 404 as for a job that does not exist."""
    if job is None or (caller.role is Role.TENANT and job.tenant != caller.tenant):
        raise NotFound(f"no job with id {job_id!r}", code="job_not_found")
    return job
