"""Roles of the admin API and what each may do.

==========  =====  ========  ======
permission  admin  operator  tenant
==========  =====  ========  ======
monitor     yes    yes       no      health, metrics, queues, dead letters (list, groups, show)
read_jobs   yes    yes       own     list jobs, one job's status and progress
submit      yes    no        own     submit a job (a tenant token always submits for its tenant)
cancel      yes    no        own     cancel a job
retry       yes    yes       no      retry a failed, dead or cancelled job
pause       yes    yes       no      pause and resume a queue
replay      yes    yes       no      replay dead letters
purge       yes    no        no      delete dead letters for good
clean       yes    no        no      delete old history
==========  =====  ========  ======

"own": a tenant token sees and acts on its own tenant's jobs only; any other job answers 404,
exactly like a job that does not exist, so a tenant never learns that another tenant's job
exists. The operator runs the platform but destroys nothing (no purge, no clean) and does not
act for the producers (no submit, no cancel). Tokens are managed with the command line only.
"""

from __future__ import annotations

from enum import StrEnum

from tasks_platform.errors import InvalidPayload


class Role(StrEnum):
    """What a token is for."""

    ADMIN = "admin"  #: everything
    OPERATOR = "operator"  #: monitor, retry, replay, pause
    TENANT = "tenant"  #: submit, see and cancel its own tenant's jobs

    @classmethod
    def parse(cls, value: str | Role) -> Role:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(role.value for role in cls)
            raise InvalidPayload(f"unknown role {value!r}; expected one of: {names}") from None


class Permission(StrEnum):
    """One kind of request (see the module's table)."""

    MONITOR = "monitor"
    READ_JOBS = "read_jobs"
    SUBMIT = "submit"
    CANCEL = "cancel"
    RETRY = "retry"
    PAUSE = "pause"
    REPLAY = "replay"
    PURGE = "purge"
    CLEAN = "clean"


PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.OPERATOR: frozenset(
        {Permission.MONITOR, Permission.READ_JOBS, Permission.RETRY, Permission.PAUSE}
        | {Permission.REPLAY}
    ),
    Role.TENANT: frozenset({Permission.READ_JOBS, Permission.SUBMIT, Permission.CANCEL}),
}


def allows(role: Role, permission: Permission) -> bool:
    return permission in PERMISSIONS[role]
