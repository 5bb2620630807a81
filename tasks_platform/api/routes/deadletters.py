"""Dead letters: list, groups by error fingerprint, show, replay, purge."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from tasks_platform.api import schemas
from tasks_platform.api.auth import Monitor, Purger, Replayer
from tasks_platform.api.context import Context

router = APIRouter(prefix="/dlq", tags=["dead letters"])

QueueFilter = Annotated[str | None, Query(min_length=1, max_length=200, description="e.g. email")]


@router.get("")
def list_dead_letters(
    _caller: Monitor,
    context: Context,
    queue: QueueFilter = None,
    group: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[schemas.DeadLetter]:
    """Dead letters of one queue or all (of one fingerprint group, if given)."""
    letters = context.dead_letters.list(queue, group=group, limit=limit)
    return [schemas.DeadLetter.model_validate(letter.as_dict()) for letter in letters]


@router.get("/groups")
def dead_letter_groups(
    _caller: Monitor, context: Context, queue: QueueFilter = None
) -> list[schemas.DeadLetterGroup]:
    """Dead letters grouped by error fingerprint (job type, exception, normalised message)."""
    groups = context.dead_letters.groups(queue)
    return [schemas.DeadLetterGroup.model_validate(group.as_dict()) for group in groups]


@router.get("/{task_id}")
def show_dead_letter(
    task_id: Annotated[str, Path(min_length=1, max_length=255)], _caller: Monitor, context: Context
) -> schemas.DeadLetter:
    """One dead letter, with its payload and traceback."""
    letter = context.dead_letters.show(task_id)
    return schemas.DeadLetter.model_validate(letter.as_dict())


@router.post("/replay")
def replay(
    selection: schemas.DeadLetterSelection, caller: Replayer, context: Context
) -> schemas.ReplayResponse:
    """Send dead letters back to their work queue, attempts reset (audited)."""
    replayed = context.dead_letters.replay(
        task_id=selection.task_id,
        queue=selection.queue,
        group=selection.group,
        actor=caller.actor,
        reason=selection.reason,
    )
    return schemas.ReplayResponse(replayed=replayed, count=len(replayed))


@router.post("/purge")
def purge(
    selection: schemas.DeadLetterSelection, caller: Purger, context: Context
) -> schemas.PurgeResponse:
    """Delete dead letters for good (audited)."""
    purged = context.dead_letters.purge(
        task_id=selection.task_id,
        queue=selection.queue,
        group=selection.group,
        actor=caller.actor,
        reason=selection.reason,
    )
    return schemas.PurgeResponse(purged=purged)
