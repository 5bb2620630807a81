"""Declaring a job type: the :func:`job` decorator and the task class behind it.

One way to declare a job type::

    class RenderReport(BaseModel):
        title: str
        rows: list[list[str]]

    @job("reports.render", queue="reports", schema=RenderReport,
         retry=RetryPolicy(max_retries=3, transient=(OSError,)), soft_time_limit=60)
    def render(payload: RenderReport) -> dict[str, str]:
        return reports.render_csv(payload.title, payload.rows)

``render.delay(title=..., rows=...)`` validates the payload against the schema before
anything is queued. In the worker, the body receives the validated model; failures are
retried or dead-lettered as the retry policy says. Retry, routing and limits live on the
declaration, never inside the body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError

from tasks_platform.errors import DeclarationError, InvalidPayload
from tasks_platform.jobs.retry import RetryPolicy
from tasks_platform.settings import Settings
from tasks_platform.topology import QUEUES, Priority

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
#: header counting how many times a job's worker process died under it
DELIVERIES_HEADER = "x-tasks-deliveries"

_declared: dict[str, tuple[str, PlatformTask]] = {}


@dataclass(frozen=True)
class JobContext:
    """What a job body may know about its own run (given to bodies declared with bind=True)."""

    id: str
    name: str
    attempt: int
    max_retries: int
    queue: str | None
    settings: Settings


class PlatformTask(Task):  # type: ignore[misc]
    """The Celery task class behind every declared job type."""

    Request = "tasks_platform.worker:PlatformRequest"
    family: str = "default"
    schema: type[BaseModel] | None = None
    retry_policy: RetryPolicy = RetryPolicy()
    platform_priority: Priority = Priority.NORMAL
    takes_context: bool = False
    body: Callable[..., Any]

    # -- producer side -----------------------------------------------------------------------
    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        args, kwargs = self.validate_payload(args or (), kwargs or {})
        topology = self.app.topology
        if not {"queue", "exchange", "routing_key"} & options.keys():
            options["queue"] = topology.queue_name(self.family)
        options["priority"] = self._broker_priority(options.get("priority"))
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )

    def validate_payload(
        self, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The payload as it will travel (JSON-ready), or InvalidPayload with the reasons."""
        if self.schema is not None:
            if args:
                raise InvalidPayload(
                    f"{self.name} takes its payload as keyword arguments, got {len(args)} "
                    "positional argument(s)"
                )
            try:
                kwargs = self.schema.model_validate(kwargs).model_dump(mode="json")
            except ValidationError as exc:
                raise InvalidPayload(f"invalid payload for {self.name}: {_summary(exc)}") from exc
        try:
            size = len(json.dumps([list(args), kwargs], separators=(",", ":")))
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"payload of {self.name} is not JSON: {exc}") from exc
        limit = self.app.settings.max_payload_bytes
        if size > limit:
            raise InvalidPayload(
                f"payload of {self.name} is {size} bytes; the limit is {limit} bytes "
                "(TASKS_MAX_PAYLOAD_BYTES): pass a reference to the data instead"
            )
        return tuple(args), kwargs

    def _broker_priority(self, value: object) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # already a broker number (a retry keeps its original priority)
        if value is None:
            name = self.platform_priority
        elif isinstance(value, str):
            try:
                name = Priority.parse(value)
            except ValueError as exc:
                raise InvalidPayload(str(exc)) from None
        else:
            raise InvalidPayload(f"priority must be a priority name, got {value!r}")
        return cast("int | None", self.app.topology.priority_value(name))

    # -- worker side -------------------------------------------------------------------------
    def effective_retry_policy(self) -> RetryPolicy:
        settings = self.app.settings
        return self.retry_policy.with_defaults(
            max_retries=settings.max_retries,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
        )

    def execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the body once; decide retry or failure from the retry policy."""
        policy = self.effective_retry_policy()
        call_args: tuple[Any, ...] = args
        call_kwargs: dict[str, Any] = kwargs
        if self.schema is not None:
            # an invalid payload is permanent: no retry can fix it
            _, valid = self.validate_payload(args, kwargs)
            call_args, call_kwargs = (self.schema.model_validate(valid),), {}
        if self.takes_context:
            call_args = (self._context(policy), *call_args)
        try:
            return self.body(*call_args, **call_kwargs)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            retries = int(self.request.retries or 0)
            decision = policy.decide(exc, retries)
            if decision.retry:
                # a retry waiting longer than Redis' visibility timeout would run twice
                delay = min(decision.delay, self.app.settings.max_countdown)
                raise self.retry(exc=exc, countdown=delay, max_retries=policy.max_retries) from exc
            raise

    def _context(self, policy: RetryPolicy) -> JobContext:
        request = self.request
        delivery = request.delivery_info or {}
        return JobContext(
            id=str(request.id),
            name=self.name,
            attempt=int(request.retries or 0) + 1,
            max_retries=policy.max_retries or 0,
            queue=delivery.get("routing_key"),
            settings=self.app.settings,
        )


def job(
    name: str,
    *,
    queue: str = "default",
    schema: type[BaseModel] | None = None,
    retry: RetryPolicy | None = None,
    priority: Priority | str = Priority.NORMAL,
    soft_time_limit: float | None = None,
    time_limit: float | None = None,
    bind: bool = False,
) -> Callable[[Callable[..., Any]], PlatformTask]:
    """Declare a job type; see the module docstring. Unknown or bad options fail here."""
    level = _check_declaration(name, queue, schema, retry, priority, soft_time_limit, time_limit)

    def decorate(body: Callable[..., Any]) -> PlatformTask:
        where = f"{body.__module__}.{body.__qualname__}"
        if name in _declared:
            if _declared[name][0] != where:
                raise DeclarationError(
                    f"job {name!r} is declared twice: {_declared[name][0]}, {where}"
                )
            return _declared[name][1]  # the same declaration again (a module reloaded)

        def run(task: PlatformTask, *args: Any, **kwargs: Any) -> Any:
            return task.execute(args, kwargs)

        run.__name__, run.__qualname__ = body.__name__, body.__qualname__
        run.__module__, run.__doc__ = body.__module__, body.__doc__
        options: dict[str, Any] = {
            "name": name,
            "base": PlatformTask,
            "bind": True,
            "family": queue,
            "schema": schema,
            "retry_policy": retry or RetryPolicy(),
            "platform_priority": level,
            "takes_context": bind,
            "body": staticmethod(body),
        }
        if soft_time_limit is not None:
            options["soft_time_limit"] = soft_time_limit
        if time_limit is not None:
            options["time_limit"] = time_limit
        task = cast(PlatformTask, shared_task(**options)(run))
        _declared[name] = (where, task)
        return task

    return decorate


def _check_declaration(
    name: str,
    queue: str,
    schema: object,
    retry: object,
    priority: Priority | str,
    soft_time_limit: float | None,
    time_limit: float | None,
) -> Priority:
    if not NAME_PATTERN.match(name):
        raise DeclarationError(
            f"job name {name!r} must be dotted lowercase words, like 'reports.render'"
        )
    if queue not in QUEUES:
        raise DeclarationError(
            f"job {name!r} names unknown queue {queue!r}; declared queues: {', '.join(QUEUES)}"
        )
    if schema is not None and not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise DeclarationError(f"job {name!r}: schema must be a pydantic model class")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise DeclarationError(f"job {name!r}: retry must be a RetryPolicy")
    for limit in (soft_time_limit, time_limit):
        if limit is not None and limit <= 0:
            raise DeclarationError(f"job {name!r}: time limits must be positive seconds")
    if soft_time_limit is not None and time_limit is not None and time_limit <= soft_time_limit:
        raise DeclarationError(f"job {name!r}: time_limit must exceed soft_time_limit")
    try:
        return Priority.parse(priority)
    except ValueError as exc:
        raise DeclarationError(f"job {name!r}: {exc}") from None


def _summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "payload"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
