"""Workflows: chains and fan-out/fan-in of platform jobs (Celery's canvas), checked up front.

::

    from celery import chain, chord, group
    from tasks_platform.workflow import start_workflow

    root_id = start_workflow(
        chain(fetch.si(url=...), parse.s(), store.s(table="orders")), tenant="acme"
    )
    root_id = start_workflow(chord([render.si(page=n) for n in range(5)], merge.s()))

Every step is recorded in the history under the workflow's *root id* (Celery's ``root_id``),
which :func:`start_workflow` returns; ``tasks-platform workflow ROOT_ID`` and
``GET /api/v1/workflows/{root_id}`` show the steps and the workflow's state
(:mod:`tasks_platform.history.workflows`).

How a step gets its payload (the rule):

* A job with a schema takes its payload as keyword arguments. A step that should not receive
  the previous step's result gets an **immutable** signature: ``job.si(**payload)``.
* A step that receives it is declared with ``parent_result="field"``: the previous step's
  result (in a chord's callback: the list of the group's results, in order) is put into that
  payload field, and the payload is validated as usual. Its signature is ``job.s(**rest)``.
* A job without a schema receives the result as a positional argument, as in plain Celery.

:func:`start_workflow` checks every step before anything is queued: an unknown job type
raises ``UnknownJob``; a mutable step of a schema job without ``parent_result``, or a payload
the step's schema refuses, raises ``InvalidPayload``. A chord (a group followed by a step)
needs a result backend to gather the group's results (``TASKS_RESULT_BACKEND``, Redis
recommended): without one, ``ConfigurationError``. ``tenant`` is set on every step, so the
whole workflow is the tenant's (the admin API shows a tenant only workflows wholly its own).

A step that fails for good ends the workflow: the steps after it are never queued, and the
workflow is ``failed``, naming that step.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from celery.canvas import Signature, _chain, group, maybe_signature
from celery.canvas import chord as chord_type
from pydantic import ValidationError

from tasks_platform.errors import ConfigurationError, InvalidPayload
from tasks_platform.intake import declared_task
from tasks_platform.jobs.declaration import PlatformTask, check_tenant
from tasks_platform.submit import platform_app

#: the most steps one workflow may have (every step's signature travels in the messages)
MAX_STEPS = 10_000


def start_workflow(canvas: Signature, *, tenant: str | None = None, app: Any = None) -> str:
    """Check ``canvas`` (see the module docstring), queue it, and return its root id."""
    app = platform_app(app)
    check_tenant(tenant)
    try:  # a copy: the caller's signatures are left as they were
        workflow = Signature.from_dict(json.loads(json.dumps(canvas)), app=app)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"a workflow's payloads must be JSON: {exc}") from exc
    for node in _nodes(workflow):  # the copy's nested signatures know no app yet
        node._app = app
    steps = list(check_workflow(workflow, app))
    if tenant is not None:
        for step, _ in steps:
            step.set(tenant=tenant)
    root_id = str(uuid.uuid4())
    workflow.apply_async(root_id=root_id)
    return root_id


def check_workflow(canvas: Signature, app: Any) -> Iterator[tuple[Signature, PlatformTask]]:
    """Every step of ``canvas`` with its job type; raises if a step could not run as written."""
    for count, (step, receives) in enumerate(_steps(canvas, receives=False), start=1):
        if count > MAX_STEPS:
            raise InvalidPayload(f"a workflow has at most {MAX_STEPS} steps")
        task = declared_task(app, step.task)
        _check_step(task, step, receives=receives and not step.immutable)
        yield step, task
    if _has_chord(canvas) and not app.settings.result_backend:
        raise ConfigurationError(
            "a chord (a group followed by a step) needs a result backend to gather the "
            "group's results: set TASKS_RESULT_BACKEND (e.g. a redis:// URL)"
        )


def _steps(canvas: Any, *, receives: bool) -> Iterator[tuple[Signature, bool]]:
    """(signature, whether the step is handed a previous step's result) for every step."""
    canvas = maybe_signature(canvas)
    if isinstance(canvas, chord_type):
        for member in canvas.tasks:
            yield from _steps(member, receives=receives)
        yield from _steps(canvas.body, receives=True)
    elif isinstance(canvas, group):
        for member in canvas.tasks:
            yield from _steps(member, receives=receives)
    elif isinstance(canvas, _chain):
        for index, step in enumerate(canvas.tasks):
            yield from _steps(step, receives=receives or index > 0)
    else:
        yield canvas, receives


def _nodes(canvas: Signature) -> Iterator[Signature]:
    """``canvas`` and every signature in it, containers included."""
    yield canvas
    if isinstance(canvas, chord_type):
        children = [*canvas.tasks, canvas.body]
    elif isinstance(canvas, group | _chain):
        children = list(canvas.tasks)
    else:
        children = []
    for child in children:
        if isinstance(child, Signature):
            yield from _nodes(child)


def _has_chord(canvas: Any) -> bool:
    canvas = maybe_signature(canvas)
    if isinstance(canvas, chord_type):
        return True
    if isinstance(canvas, _chain):
        steps = list(canvas.tasks)
        # a group followed by a step in a chain becomes a chord
        if any(isinstance(maybe_signature(s), group) for s in steps[:-1]):
            return True
        return any(_has_chord(step) for step in steps)
    if isinstance(canvas, group):
        return any(_has_chord(member) for member in canvas.tasks)
    return False


def _check_step(task: PlatformTask, step: Signature, *, receives: bool) -> None:
    if task.schema is None:
        task.validate_payload(tuple(step.args or ()), dict(step.kwargs or {}))
        return
    if step.args:
        raise InvalidPayload(
            f"step {task.name} takes its payload as keyword arguments, got positional ones"
        )
    if receives and task.parent_result is None:
        raise InvalidPayload(
            f"step {task.name} would receive the previous step's result, but its job type "
            "takes no result: give it an immutable signature (.si(...)), or declare it with "
            "parent_result='field'"
        )
    if not receives:
        task.validate_payload((), dict(step.kwargs or {}))
        return
    # the result is not known yet: every field but the one receiving it must be valid now
    try:
        task.schema.model_validate(dict(step.kwargs or {}))
    except ValidationError as exc:
        others = [e for e in exc.errors() if e["loc"][:1] != (task.parent_result,)]
        if others:
            where = ".".join(str(part) for part in others[0]["loc"]) or "payload"
            raise InvalidPayload(
                f"invalid payload for step {task.name}: {where}: {others[0]['msg']}"
            ) from exc
