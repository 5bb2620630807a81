"""Queues, pause/resume, clean, health, metrics: running the platform."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import PlainTextResponse

from tasks_platform.api import schemas
from tasks_platform.api.auth import Cleaner, Monitor, Pauser
from tasks_platform.api.context import Context
from tasks_platform.history.models import QueuePause
from tasks_platform.stats import CONTENT_TYPE, Snapshot
from tasks_platform.topology import QUEUES

router = APIRouter()

QueueName = Annotated[
    str, Path(min_length=1, max_length=200, description="A work queue.", examples=["email"])
]
OptionalAction = Annotated[schemas.ActionRequest | None, Body()]
Window = Annotated[
    int, Query(ge=1, le=7 * 86_400, description="Seconds the job figures look back.")
]


@router.get("/live", tags=["system"])
def live() -> schemas.Live:
    """The server answers (no token needed, nothing else is checked): a liveness probe."""
    return schemas.Live(status="ok")


@router.get("/health", tags=["system"])
def health(_caller: Monitor, context: Context, window_seconds: Window = 900) -> schemas.Health:
    """The health verdict (healthy, warning, critical) and its alerts."""
    verdict = context.stats.health(window=timedelta(seconds=window_seconds))
    return schemas.Health.model_validate(verdict.as_dict())


@router.get(
    "/metrics",
    tags=["system"],
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format."}},
)
def metrics(_caller: Monitor, context: Context) -> PlainTextResponse:
    """Queue depths, dead letters, workers and job figures in Prometheus' text format."""
    return PlainTextResponse(context.stats.prometheus(), media_type=CONTENT_TYPE)


@router.get("/queues", tags=["queues"])
def queues(
    _caller: Monitor, context: Context, window_seconds: Window = 900
) -> schemas.QueuesResponse:
    """Every work queue: depth (per priority), consumers, dead letters, paused; job figures."""
    snapshot = context.stats.snapshot(window=timedelta(seconds=window_seconds))
    pauses = {pause.queue: pause for pause in context.control.paused()}
    return schemas.QueuesResponse(
        queues=[_queue(snapshot, family, pauses.get(family)) for family in QUEUES],
        workers=list(snapshot.workers),
        window=None if snapshot.window is None else snapshot.window.as_dict(),
        unavailable=dict(snapshot.unavailable),
    )


@router.post("/queues/{queue}/pause", tags=["queues"])
def pause(
    queue: QueueName, caller: Pauser, context: Context, body: OptionalAction = None
) -> schemas.PauseResponse:
    """Stop every worker consuming this queue, until it is resumed (durable)."""
    context.control.pause(queue, actor=caller.actor, reason=body.reason if body else None)
    return schemas.PauseResponse(queue=queue, paused=True)


@router.post("/queues/{queue}/resume", tags=["queues"])
def resume(
    queue: QueueName, caller: Pauser, context: Context, body: OptionalAction = None
) -> schemas.PauseResponse:
    """Let the workers consume this queue again."""
    context.control.resume(queue, actor=caller.actor, reason=body.reason if body else None)
    return schemas.PauseResponse(queue=queue, paused=False)


@router.post("/clean", tags=["jobs"])
def clean(
    request: schemas.CleanRequest, caller: Cleaner, context: Context
) -> schemas.CleanResponse:
    """Delete the history (and results) of jobs that ended longer ago than given."""
    older_than = timedelta(seconds=request.older_than_seconds)
    return schemas.CleanResponse(deleted=context.control.clean(older_than, actor=caller.actor))


def _queue(snapshot: Snapshot, family: str, pause: QueuePause | None) -> schemas.Queue:
    known = "broker" not in snapshot.unavailable
    return schemas.Queue(
        name=family,
        depth=snapshot.depth(family) if known else None,
        by_priority={d.priority: d.messages for d in snapshot.depths if d.queue == family},
        consumers=list(snapshot.consumers.get(family, ())),
        dead_letters=snapshot.dead_letters.get(family) if known else None,
        paused=pause is not None,
        paused_at=pause.paused_at if pause else None,
        paused_by=pause.actor if pause else None,
        pause_reason=pause.reason if pause else None,
    )
