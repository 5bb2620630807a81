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

import errno
import json
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast

from celery import Task, shared_task, signals
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.utils.dispatch import Signal
from celery.utils.saferepr import saferepr
from pydantic import BaseModel, ValidationError

from tasks_platform.cancellation import cancellation_requested
from tasks_platform.errors import (
    BrokerUnavailable,
    DeclarationError,
    InvalidPayload,
    JobCancelled,
    PublishNotConfirmed,
)
from tasks_platform.history.redaction import redact
from tasks_platform.jobs.retry import RetryPolicy
from tasks_platform.settings import Settings
from tasks_platform.topology import QUEUES, Priority

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
#: header counting how many times a job's worker process died under it
DELIVERIES_HEADER = "x-tasks-deliveries"
#: header naming the tenant a job belongs to
TENANT_HEADER = "tenant"
#: the longest payload repr shown to monitors (Celery's own default)
REPR_MAX = 1024
#: header holding the key a job was submitted with (scoped per tenant)
IDEMPOTENCY_KEY_HEADER = "idempotency_key"
#: header naming one publish of a job with an idempotency key (a redelivery keeps it; a second
#: publish of the job, after a publish whose outcome was unknown, has another one)
PUBLISH_ID_HEADER = "x-tasks-publish"
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,200}$")
#: header naming the job's priority (the broker only knows its number)
PRIORITY_HEADER = "x-tasks-priority"
#: header counting how many times an operator replayed the job from its dead-letter queue
REPLAYS_HEADER = "x-tasks-replays"
#: header naming the job an operator retried this one from (a new job with a new id)
RETRY_OF_HEADER = "x-tasks-retry-of"
#: the app publishing a job in this thread right now: Celery's publish signals name no app,
#: and one process may hold several apps (each with its own history)
PUBLISHING_APP: ContextVar[Any] = ContextVar("tasks_platform_publishing_app", default=None)
#: sent by JobContext.report_progress (sender: the task; job_id, attempt, replays, worker,
#: percent, note); the history recorder keeps the latest report of each running job
job_progress = Signal(name="job_progress")
#: the longest progress note kept (longer ones are cut)
PROGRESS_NOTE_MAX = 500
#: at most one ``task-progress`` monitoring event per job and this many seconds
PROGRESS_EVENT_INTERVAL = 1.0

logger = logging.getLogger(__name__)

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
    #: whose job this is (the ``tenant`` header), if anyone's
    tenant: str | None = None
    #: the key the job was submitted with (the ``idempotency_key`` header), if any
    idempotency_key: str | None = None
    #: where report_progress sends its reports (set by the worker; None: reports go nowhere)
    progress_sink: Callable[[float, str | None], None] | None = field(
        default=None, repr=False, compare=False
    )

    def report_progress(self, percent: float, note: str | None = None) -> None:
        """Say how far the job is: ``percent`` from 0 to 100 (clamped), and an optional note.

        Cheap, and never fails or blocks the job: the history keeps the latest report of the
        attempt (``percent``, ``progress_note``; a note is cut to 500 characters), written with
        the next batch, and monitors get a ``task-progress`` event at most once a second.
        A percent that is not a finite number is a bug in the job: ``ValueError``.
        """
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise ValueError(f"percent must be a number from 0 to 100, got {percent!r}")
        if not math.isfinite(percent):
            raise ValueError(f"percent must be a finite number from 0 to 100, got {percent!r}")
        if note is not None:
            note = str(note)[:PROGRESS_NOTE_MAX]
        if self.progress_sink is not None:
            self.progress_sink(min(max(float(percent), 0.0), 100.0), note)

    def cancelled(self) -> bool:
        """True once an operator cancelled this job: stop soon (cheap; call it often).

        Where the pool cannot terminate a running job (threads, solo), this is how it stops;
        the store is read at most once a second per job.
        """
        return cancellation_requested(self.settings, self.id)

    def raise_if_cancelled(self) -> None:
        """Raise :class:`~tasks_platform.errors.JobCancelled` if the job was cancelled.

        Let it propagate: the job is then recorded ``revoked``, never retried or dead-lettered.
        """
        if self.cancelled():
            raise JobCancelled(f"job {self.id} was cancelled by an operator")


class PlatformTask(Task):  # type: ignore[misc]
    """The Celery task class behind every declared job type."""

    Request = "tasks_platform.worker:PlatformRequest"
    family: str = "default"
    schema: type[BaseModel] | None = None
    retry_policy: RetryPolicy = RetryPolicy()
    platform_priority: Priority = Priority.NORMAL
    takes_context: bool = False
    #: payload fields kept out of the history (besides the secret-looking ones)
    sensitive: tuple[str, ...] = ()
    #: the payload field that receives the previous step's result in a workflow
    parent_result: str | None = None
    #: a dead-lettered job of this type also raises an alert (a CRITICAL log line, an event)
    alert_on_dead: bool = False
    #: apply_async goes through the outbox, in a transaction of its own (tasks_platform.outbox)
    outbox: bool = False
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
        direct = options.pop("direct", False)  # True: never through the outbox
        if self.outbox and not direct and _outbox_eligible(options, producer, link, link_error):
            # through the outbox, in a transaction of its own; the relay publishes it
            from tasks_platform.outbox.submit import apply_in_own_transaction  # noqa: PLC0415

            given = {"task_id": task_id, "shadow": shadow}
            options.update({k: v for k, v in given.items() if v is not None})
            return apply_in_own_transaction(self, args, kwargs, options)
        key = options.pop("idempotency_key", None)
        if key is not None:  # once per key and tenant: a repeat gives the first job's result
            from tasks_platform.intake import apply_once  # noqa: PLC0415 - it imports this module

            given = {"task_id": task_id, "producer": producer, "link": link,
                     "link_error": link_error, "shadow": shadow}  # fmt: skip
            options.update({k: v for k, v in given.items() if v is not None})
            return apply_once(self, key, args, kwargs, options)
        args, kwargs, options = self.publish_options(args or (), kwargs or {}, options)
        if self.app.settings.tenant_limits:  # a rate-limited tenant's jobs enter at its rate
            from tasks_platform.limits.pacing import pace  # noqa: PLC0415 - it imports this module

            task_id, deferred = pace(self, args, kwargs, options, task_id=task_id, link=link,
                                     link_error=link_error, shadow=shadow)  # fmt: skip
            if deferred is not None:
                return deferred  # waits for its slot in Redis; a worker publishes it then
        publishing = PUBLISHING_APP.set(self.app)
        failures: list[BaseException] = []  # each failed try kombu retried: see _publish_error
        policy = options.get("retry_policy") or {}
        errback = policy.get("errback")  # the caller's own: _failed_try calls it
        if errback is _failed_try:
            errback = None
        noting = _PUBLISH_TRIES.set(_Tries(failures, errback=errback))
        options["retry_policy"] = {**policy, "errback": _failed_try}
        try:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        except Exception as exc:
            translated = _publish_error(self.name, exc, failures)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            _PUBLISH_TRIES.reset(noting)
            PUBLISHING_APP.reset(publishing)

    def publish_options(
        self, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        """The validated payload and the options it is published with: tenant and priority
        headers, its family's queue, the broker's priority number, redacted reprs."""
        args, kwargs = self.validate_payload(args, kwargs)
        tenant = options.pop("tenant", None)
        if tenant is not None:  # whose job this is: history, limits, usage
            check_tenant(tenant)
            options["headers"] = {**(options.get("headers") or {}), TENANT_HEADER: tenant}
        topology = self.app.topology
        if not {"queue", "exchange", "routing_key"} & options.keys():
            options["queue"] = topology.queue_name(self.family)
        priority = options.get("priority")
        options["priority"] = self._broker_priority(priority)
        if not isinstance(priority, int):  # a name: say it in a header (history, monitoring)
            name = Priority.parse(priority) if priority else self.platform_priority
            options["headers"] = {**(options.get("headers") or {}), PRIORITY_HEADER: name.value}
        # what monitors show (events, inspect, Flower, logs): the payload without its secrets
        options.setdefault("argsrepr", saferepr(redact(list(args), self.sensitive), REPR_MAX))
        options.setdefault("kwargsrepr", saferepr(redact(kwargs, self.sensitive), REPR_MAX))
        return args, kwargs, options

    def apply_in(
        self,
        session: Any,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Any:
        """Like ``apply_async``, but the job is written to the outbox in ``session``'s
        transaction (never committed here): it runs if and only if the caller commits.
        Returns the job's AsyncResult (the first job's, for a repeated idempotency key)."""
        from tasks_platform.outbox.store import enqueue  # noqa: PLC0415 - it imports this module

        submitted = enqueue(session, self, args, kwargs, key=idempotency_key, options=options)
        return submitted.result or self.AsyncResult(submitted.id)

    def delay_in(self, session: Any, *args: Any, **kwargs: Any) -> Any:
        """``delay()`` through the outbox, in ``session``'s transaction (see :meth:`apply_in`)."""
        return self.apply_in(session, args, kwargs)

    def delay_many(self, payloads: Any, **options: Any) -> list[str]:
        """Queue one job per payload with pipelined publishes; the ids, in order.

        Every payload is validated first (nothing is queued if one is invalid). Options:
        ``priority``, ``tenant``, ``countdown``, ``idempotency_keys``, ``batch_size``; see
        :mod:`tasks_platform.bulk`.
        """
        from tasks_platform.bulk import queue_many  # noqa: PLC0415 - it imports this module

        return queue_many(self, payloads, **options)

    def validate_payload(
        self, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The payload as it will travel (JSON-ready), or InvalidPayload with the reasons."""
        if self.schema is not None:
            if args and self.parent_result is not None and len(args) == 1:
                # a workflow step: the previous step's result goes in the declared field
                kwargs = {**kwargs, self.parent_result: args[0]}
                args = ()
            if args:
                raise InvalidPayload(
                    f"{self.name} takes its payload as keyword arguments, got {len(args)} "
                    "positional argument(s); in a workflow, give it an immutable signature "
                    "(.si(...)), or declare it with parent_result='field' to receive the "
                    "previous step's result"
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
        """The declared policy, its unset parts taken from the settings (worked out once per
        policy and settings: it is asked for every job)."""
        settings = self.app.settings
        known = self.__dict__.get("_effective_policy")
        if known is not None and known[0] is self.retry_policy and known[1] is settings:
            return known[2]  # type: ignore[no-any-return]
        policy = self.retry_policy.with_defaults(
            max_retries=settings.max_retries,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
        )
        self.__dict__["_effective_policy"] = (self.retry_policy, settings, policy)
        return policy

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
        except JobCancelled:
            self._stopped_by_operator()
            raise Ignore() from None
        except Exception as exc:
            retries = int(self.request.retries or 0)
            decision = policy.decide(exc, retries)
            if decision.retry:
                # a retry waiting longer than Redis' visibility timeout would run twice
                delay = min(decision.delay, self.app.settings.max_countdown)
                raise self.retry(exc=exc, countdown=delay, max_retries=policy.max_retries) from exc
            raise

    def _stopped_by_operator(self) -> None:
        """Announce a job that stopped because it was cancelled, as Celery does a terminated one."""
        request = self.request
        self.send_event("task-revoked", terminated=True, signum=None, expired=False)
        signals.task_revoked.send(sender=self, request=request, terminated=True, signum=None,
                                  expired=False)  # fmt: skip

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
            tenant=_header(request, TENANT_HEADER),
            idempotency_key=_header(request, IDEMPOTENCY_KEY_HEADER),
            progress_sink=self._progress_sink(),
        )

    def _progress_sink(self) -> Callable[[float, str | None], None]:
        """Reports of the running attempt: to the history (``job_progress``) and to monitors."""
        request = self.request
        job_id, hostname = str(request.id), request.hostname
        attempt = int(request.retries or 0) + 1
        replays = int((request.headers or {}).get(REPLAYS_HEADER) or 0)
        last_event = [-math.inf]

        def report(percent: float, note: str | None) -> None:
            job_progress.send(sender=self, job_id=job_id, attempt=attempt, replays=replays,
                              worker=hostname, percent=percent, note=note)  # fmt: skip
            now = time.monotonic()
            if now - last_event[0] >= PROGRESS_EVENT_INTERVAL or percent >= 100.0:
                last_event[0] = now
                self._send_progress_event(job_id, hostname, percent, note)

        return report

    def _send_progress_event(
        self, job_id: str, hostname: str | None, percent: float, note: str | None
    ) -> None:
        if not self.app.conf.worker_send_task_events:
            return
        try:
            with self.app.events.default_dispatcher(hostname=hostname) as dispatcher:
                dispatcher.send("task-progress", uuid=job_id, retry=False, percent=percent,
                                note=note)  # fmt: skip
        except Exception as exc:  # a monitoring event is never worth failing the job
            logger.warning("could not send task-progress of %s: %s", job_id, exc)


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
    sensitive: tuple[str, ...] = (),
    alert_on_dead: bool = False,
    parent_result: str | None = None,
    outbox: bool = False,
) -> Callable[[Callable[..., Any]], PlatformTask]:
    """Declare a job type; see the module docstring. Unknown or bad options fail here.

    ``parent_result`` names the payload field that receives the previous step's result when
    the job is a step of a workflow (a chain's next step, a chord's callback); see
    :mod:`tasks_platform.workflow`. ``outbox=True`` sends ``apply_async``/``delay`` of the job
    through the outbox (:mod:`tasks_platform.outbox`): durable even while the broker is down.
    """
    level = _check_declaration(name, queue, schema, retry, priority, soft_time_limit, time_limit)
    _check_parent_result(name, schema, parent_result)

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
            "sensitive": tuple(sensitive),
            "alert_on_dead": bool(alert_on_dead),
            "parent_result": parent_result,
            "outbox": bool(outbox),
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


def check_tenant(tenant: object) -> None:
    """InvalidPayload unless ``tenant`` (when given) is a valid tenant name."""
    if tenant is not None and not (isinstance(tenant, str) and TENANT_PATTERN.match(tenant)):
        raise InvalidPayload(
            f"tenant must be 1-200 letters, digits or '._:@-' characters, got {tenant!r}"
        )


def _check_parent_result(name: str, schema: object, parent_result: str | None) -> None:
    if parent_result is None:
        return
    fields = getattr(schema, "model_fields", None) if schema is not None else None
    if not fields or parent_result not in fields:
        raise DeclarationError(
            f"job {name!r}: parent_result {parent_result!r} must name a field of its schema "
            "(a job without a schema receives the previous result as a positional argument)"
        )


def _outbox_eligible(options: dict[str, Any], producer: Any, link: Any, link_error: Any) -> bool:
    """A first publish with nothing the outbox cannot keep (retries, callbacks, a producer and
    paced jobs are published directly)."""
    headers = options.get("headers") or {}
    return (
        int(options.get("retries") or headers.get("retries") or 0) == 0
        and producer is None
        and link is None
        and link_error is None
        and not {"chain", "chord", "group_id", "connection", "publisher"} & options.keys()
        and "x-tasks-paced" not in headers
    )


@dataclass
class _Tries:
    """The publish running in this context: its failed tries, its message's headers, and the
    errback its caller gave in its retry policy (called after the platform's own)."""

    failures: list[BaseException]
    headers: dict[str, Any] | None = None
    errback: Callable[[BaseException, float], Any] | None = None


#: the publish apply_async is making in this context (kombu's retry errback has no other way in)
_PUBLISH_TRIES: ContextVar[_Tries | None] = ContextVar("tasks_platform_publish", default=None)


def _message_headers(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish``: keep the headers of a keyed job's message (the very dict kombu
    publishes, on every try) for :func:`_failed_try`."""
    tries = _PUBLISH_TRIES.get()
    if tries is not None and headers is not None and PUBLISH_ID_HEADER in headers:
        tries.headers = headers


signals.before_task_publish.connect(_message_headers, weak=False, dispatch_uid="publish-tries")


def _failed_try(exc: BaseException, interval: float) -> None:
    """kombu's errback, called before it tries a publish again: note the failure, and give a
    keyed job's next try a publish id of its own if this one may have reached the broker (a
    worker then runs one of the copies: :func:`tasks_platform.outbox.delivery.is_duplicate`).

    kombu keeps a publish's retry policy in its connection's transport options, so this is
    also called outside any publish (when that connection reconnects): then it does nothing.
    """
    tries = _PUBLISH_TRIES.get()
    if tries is None:
        return
    tries.failures.append(exc)
    if tries.headers is not None and not _never_connected(exc):
        tries.headers[PUBLISH_ID_HEADER] = uuid.uuid4().hex
    if tries.errback is not None:
        tries.errback(exc, interval)


def _publish_error(name: str, exc: Exception, failures: list[BaseException]) -> Exception:
    """A failed publish as the platform's error, else ``exc`` itself.

    ``failures`` are the earlier tries kombu retried. "Nothing was queued" is said only if no
    try reached a broker (each was refused a connection, or found no host). A connection lost
    during a try may have been lost after the broker took the message: that job *may* be
    queued, and the error (PublishNotConfirmed) says so.
    """
    from kombu.exceptions import OperationalError  # noqa: PLC0415 - only on a failed publish

    nacked = _nacked(exc)
    kind = "MessageNacked" if nacked else type(exc).__name__
    if nacked or isinstance(exc, TimeoutError):
        return PublishNotConfirmed(
            f"the broker did not confirm the publish of a {name} job ({kind}): it may be "
            "queued or not; submit it again with an idempotency key (it runs once) or through "
            "the outbox"
        )
    if not isinstance(exc, OperationalError | ConnectionError):
        return exc
    lost = [e for e in (*failures, exc) if not _never_connected(e)]
    if lost:
        cause = lost[0]
        return PublishNotConfirmed(
            f"the connection to the broker was lost while publishing a {name} job "
            f"({type(cause).__name__}: {cause}): it may be queued or not; submit it again with "
            "an idempotency key (it runs once) or through the outbox"
        )
    return BrokerUnavailable(
        f"could not publish a {name} job: the broker is unavailable ({kind}: {exc}); "
        "nothing was queued"
    )


#: errnos of a connection that was never made
_NO_CONNECTION_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
#: functions (py-amqp's, redis-py's, kombu's) that make a connection: an error raised inside
#: one (a refusal, a peer that never answers the handshake) came before anything was sent
_CONNECTING = frozenset(
    {"connect", "_connect", "on_connect", "establish_connection", "ensure_connection",
     "_ensure_connection", "_connection_factory"}
)  # fmt: skip


def _never_connected(exc: BaseException) -> bool:
    """True if ``exc`` (or what it wraps) was raised while making a connection."""
    return any(_while_connecting(seen) for seen in _wrapped(exc))


def _while_connecting(exc: BaseException) -> bool:
    if isinstance(exc, socket.gaierror) or (
        isinstance(exc, OSError) and exc.errno in _NO_CONNECTION_ERRNOS
    ):
        return True
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name in _CONNECTING:
            return True
        frame = frame.tb_next
    return False


def _nacked(exc: BaseException) -> bool:
    """True if the broker nacked the publish: kombu treats a nack as a recoverable connection
    error (it retries the publish) and raises OperationalError from the last one."""
    return any(type(seen).__name__ == "MessageNacked" for seen in _wrapped(exc))


def _wrapped(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: kombu's and redis-py's wrappers make a short chain (e.g.
    OperationalError <- MessageNacked), of which the first five are looked at."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "payload"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _header(request: Any, name: str) -> str | None:
    """A custom header of the running job's message (Celery keeps them in ``request.headers``)."""
    headers = getattr(request, "headers", None)
    value = headers.get(name) if isinstance(headers, dict) else None
    if value is None:
        value = getattr(request, name, None)
    return None if value is None else str(value)
