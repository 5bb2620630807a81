"""Workflows: a chain, group or chord of jobs, by its root id."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from tasks_platform.api import schemas
from tasks_platform.api.auth import JobReader
from tasks_platform.api.context import Context
from tasks_platform.api.errors import NotFound
from tasks_platform.api.roles import Role
from tasks_platform.history.workflows import find_workflow

router = APIRouter(prefix="/workflows", tags=["workflows"])

RootId = Annotated[str, Path(min_length=1, max_length=64, description="The workflow's root id.")]


@router.get("/{root_id}")
def show_workflow(root_id: RootId, caller: JobReader, context: Context) -> schemas.Workflow:
    """A workflow's state, its steps in order, and the step(s) that failed it.

    A tenant token sees a workflow only if every step of it is its tenant's; any other is the
    same 404 as a workflow that does not exist.
    """
    with context.sessions() as session:
        found = find_workflow(session, root_id)
        hidden = caller.role is Role.TENANT and (
            found is None or found.tenants != frozenset({caller.tenant})
        )
        if found is None or hidden:
            raise NotFound(f"no workflow with root id {root_id!r}", code="workflow_not_found")
        view: dict[str, Any] = found.as_dict()
    for step in view["steps"]:
        step["payload"] = step.pop("kwargs", None)
    return schemas.Workflow.model_validate(view)
