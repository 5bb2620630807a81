"""Reading a workflow from the history: its steps, its state, the step(s) that failed it.

A workflow is every job recorded under one *root id* (Celery's ``root_id``: the id
:func:`~tasks_platform.workflow.start_workflow` returns, or the first job's id for a canvas
queued without it). Its state:

* ``failed`` once a step failed for good: ``failed`` or ``dead``, or it was ``cancelled``,
  ``revoked`` or ``expired`` (the steps after it will never run). Those steps are named in
  ``failing``, with their error;
* ``succeeded`` when every step succeeded. A step queues the next one before its own success
  is recorded, so a workflow whose known steps all succeeded has no step left to come;
* ``running`` otherwise (a step is queued, started or retrying).

Like every repository query, :func:`find_workflow` takes a Session and never commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from tasks_platform.history.models import Job, JobState
from tasks_platform.history.repository import row_as_dict

#: the most steps read in full (the state is computed over every step, however many)
MAX_STEPS = 1000
#: the most failing steps named
MAX_FAILING = 20
#: step states that end a workflow unsuccessfully
FAILING_STATES = frozenset(
    {JobState.FAILED, JobState.DEAD, JobState.CANCELLED, JobState.REVOKED, JobState.EXPIRED}
)


class WorkflowState(StrEnum):
    """Where a workflow is (see the module docstring)."""

    RUNNING = "running"  #: a step is queued, started or retrying
    SUCCEEDED = "succeeded"  #: every step succeeded
    FAILED = "failed"  #: a step failed for good, or was cancelled: the workflow will not finish


@dataclass(frozen=True)
class Workflow:
    """A workflow as the history knows it."""

    root_id: str
    state: WorkflowState
    #: its steps in the order they were queued (at most MAX_STEPS of them)
    steps: list[Job]
    #: how many steps there are in all
    step_count: int
    #: the steps that failed it (at most MAX_FAILING), in the order they were queued
    failing: list[Job]
    #: the tenants its steps belong to (None: a step of no tenant)
    tenants: frozenset[str | None]

    @property
    def truncated(self) -> bool:
        return self.step_count > len(self.steps)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the state, every step's row, the failing steps in short."""
        return {
            "root_id": self.root_id,
            "state": self.state.value,
            "step_count": self.step_count,
            "truncated": self.truncated,
            "failing": [failing_step(job) for job in self.failing],
            "steps": [row_as_dict(job) for job in self.steps],
        }


def failing_step(job: Job) -> dict[str, Any]:
    """What names a failing step: its job type, id, state and error."""
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "error_type": job.error_type,
        "error_message": job.error_message,
    }


def find_workflow(session: Session, root_id: str) -> Workflow | None:
    """The workflow whose root id is ``root_id``, or None if the history has no step of it."""
    member = _member(root_id)
    counts = {
        str(state): int(count)
        for state, count in session.execute(
            select(Job.state, func.count()).where(member).group_by(Job.state)
        ).all()
    }
    if not counts:
        return None
    # a step's queued_at may be written after its start (by the process that queued it)
    order = (func.coalesce(Job.queued_at, Job.started_at, Job.updated_at), Job.id)
    steps = list(session.scalars(select(Job).where(member).order_by(*order).limit(MAX_STEPS)))
    failing_query = select(Job).where(member, Job.state.in_([str(s) for s in FAILING_STATES]))
    failing = list(session.scalars(failing_query.order_by(*order).limit(MAX_FAILING)))
    tenants = frozenset(session.scalars(select(Job.tenant).where(member).distinct()))
    return Workflow(
        root_id=root_id,
        state=_state(counts),
        steps=steps,
        step_count=sum(counts.values()),
        failing=failing,
        tenants=tenants,
    )


def _member(root_id: str) -> ColumnElement[bool]:
    # the first job of a canvas queued without a root id is its own root
    return or_(Job.root_id == root_id, Job.id == root_id)


def _state(counts: dict[str, int]) -> WorkflowState:
    if any(counts.get(str(state)) for state in FAILING_STATES):
        return WorkflowState.FAILED
    if set(counts) == {JobState.SUCCEEDED.value}:
        return WorkflowState.SUCCEEDED
    return WorkflowState.RUNNING
