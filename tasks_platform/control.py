"""Operating jobs and queues: cancel, retry, pause, resume and clean (:class:`Control`).

::

    control = Control(app, session_factory(create_history_engine(app.settings)))
    control.cancel(job_id, actor="ops:ana", reason="customer asked")   # "cancelled" | "terminating"
    new_id = control.retry(job_id, actor="ops:ana")
    control.pause("email", actor="ops:ana", reason="SMTP provider down")
    control.resume("email", actor="ops:ana")

The history database holds what must outlast the workers: a cancellation
(:class:`~tasks_platform.history.models.JobCancellation`) or a pause
(:class:`~tasks_platform.history.models.QueuePause`) is committed together with its audit entry,
and only then are the live workers told by broadcast. Workers started later read the same rows
(:mod:`tasks_platform.worker_control`), so a cancelled job never runs and a paused queue stays
paused across worker restarts. A broker that cannot be reached for the broadcast is logged: the
live workers then apply the change at their next recheck (``control_recheck_interval``).

*Cancel*: a job that is waiting (queued, or retrying after a delay) is discarded by whichever
worker receives it and recorded ``cancelled``; a running job is terminated where the pool allows
it (prefork, recorded ``revoked``), otherwise it is asked to stop and stops at its next
:meth:`JobContext.raise_if_cancelled() <tasks_platform.jobs.JobContext.raise_if_cancelled>`.

*Retry* queues a **new** job (new id, same job type, payload, priority and tenant) whose history
row names the original in ``retry_of``; the original's row stays as it was. The payload comes
from the job's dead letter when the job is still in its dead-letter queue (the letter is then
removed, so that it cannot be replayed as well, and that removal is audited as a ``dlq.purge``),
otherwise from the history, which redacts secrets: a job whose recorded payload was redacted
cannot be retried from it, and :class:`~tasks_platform.errors.JobNotRetryable` says so.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.audit import record_action
from tasks_platform.deadletter import DeadLetter, DeadLetters
from tasks_platform.errors import (
    DeadLetterNotFound,
    InvalidPayload,
    JobFinished,
    JobNotFound,
    JobNotRetryable,
    UnknownQueue,
)
from tasks_platform.history.models import (
    TERMINAL_STATES,
    Job,
    JobCancellation,
    JobState,
    QueuePause,
)
from tasks_platform.history.redaction import REDACTED
from tasks_platform.history.repository import JobRepository, row_as_dict
from tasks_platform.jobs.declaration import RETRY_OF_HEADER, PlatformTask
from tasks_platform.stats import BROKER_ERRORS
from tasks_platform.stats.broker import queue_depths
from tasks_platform.topology import QUEUES

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)

#: states a job can be retried from
RETRYABLE_STATES = frozenset(
    {JobState.FAILED, JobState.DEAD, JobState.CANCELLED, JobState.REVOKED, JobState.EXPIRED}
)
#: a cancel is too late once the job is in one of these
_ENDED = frozenset({*TERMINAL_STATES, JobState.FAILED})
#: values the history writes in place of what it did not keep
_REDACTION_MARKS = frozenset({REDACTED, "[too deep]"})


@dataclass(frozen=True)
class QueueState:
    """A work queue as an operator sees it: waiting jobs, and its pause if it is paused."""

    name: str
    depth: int
    pause: QueuePause | None

    @property
    def paused(self) -> bool:
        return self.pause is not None

    def as_dict(self) -> dict[str, Any]:
        pause = None if self.pause is None else row_as_dict(self.pause)
        return {"name": self.name, "depth": self.depth, "paused": self.paused, "pause": pause}


class Control:
    """Cancel and retry jobs, pause and resume queues, clean the history; all audited."""

    def __init__(self, app: PlatformCelery, sessions: sessionmaker[Session]) -> None:
        self.app = app
        self.sessions = sessions

    # -- jobs --------------------------------------------------------------------------------
    def cancel(self, job_id: str, *, actor: str, reason: str | None = None) -> str:
        """Cancel a job: ``"cancelled"`` if it was waiting, ``"terminating"`` if it was running.

        Raises :class:`JobNotFound` for an id the history does not know and :class:`JobFinished`
        for a job that already ended.
        """
        with self.sessions.begin() as session:
            job = self._job(session, job_id)
            state = JobState(job.state)
            if state in _ENDED:
                raise JobFinished(f"job {job_id} already ended ({state}): nothing to cancel")
            outcome = "terminating" if state is JobState.STARTED else "cancelled"
            if session.get(JobCancellation, job_id) is None:
                session.add(JobCancellation(job_id=job_id, requested_at=datetime.now(UTC),
                                            actor=actor, reason=reason))  # fmt: skip
            record_action(session, actor=actor, action="job.cancel", target=f"job:{job_id}",
                          reason=reason, detail={"state": str(state), "outcome": outcome,
                                                 "worker": job.worker})  # fmt: skip
        self._broadcast("platform_cancel", job_id=job_id)
        return outcome

    def retry(self, job_id: str, *, actor: str, reason: str | None = None) -> str:
        """Queue a new attempt of a failed, dead, cancelled, revoked or expired job; its new id.

        A job cancelled while it waited counts as cancelled at once, before a worker discards
        it. Raises :class:`JobNotFound` or :class:`JobNotRetryable` (with the reason).
        """
        job, task = self._retryable(job_id)
        state = JobState(job.state)
        letter = self._dead_letter(job_id) if state in (JobState.DEAD, JobState.FAILED) else None
        new_id = _publish_again(task, job, *_payload_of(job, letter))
        detail = {"new_job_id": new_id, "state": str(state),
                  "payload_from": "dead_letter" if letter else "history"}  # fmt: skip
        try:
            with self.sessions.begin() as session:
                record_action(session, actor=actor, action="job.retry", target=f"job:{job_id}",
                              reason=reason, detail=detail)  # fmt: skip
        except SQLAlchemyError:
            logger.exception("job %s was retried as %s by %s, but that is not in the audit log",
                             job_id, new_id, actor)  # fmt: skip
            raise
        if letter is not None:
            self._remove_dead_letter(job_id, new_id, actor=actor)
        return new_id

    def _retryable(self, job_id: str) -> tuple[Job, PlatformTask]:
        """The job and its job type, if it can be retried; else JobNotRetryable says why."""
        with self.sessions() as session:
            job = self._job(session, job_id)
            cancelled = session.get(JobCancellation, job_id) is not None
        state = JobState(job.state)
        # a cancelled job that no worker has discarded yet is still "queued" in the history
        waiting = state in (JobState.QUEUED, JobState.RETRYING)
        if state not in RETRYABLE_STATES and not (cancelled and waiting):
            allowed = ", ".join(sorted(RETRYABLE_STATES))
            raise JobNotRetryable(f"job {job_id} is {state}; only {allowed} jobs can be retried")
        task = self.app.tasks.get(job.name or "")
        if not isinstance(task, PlatformTask):
            raise JobNotRetryable(f"job {job_id} is of type {job.name!r}, which is not declared")
        return job, task

    # -- queues ------------------------------------------------------------------------------
    def pause(self, queue: str, *, actor: str, reason: str | None = None) -> None:
        """Stop every worker consuming ``queue``, now and after restarts; jobs still queue."""
        family = self._family(queue)
        with self.sessions.begin() as session:
            already = session.get(QueuePause, family) is not None
            if not already:
                session.add(QueuePause(queue=family, paused_at=datetime.now(UTC), actor=actor,
                                       reason=reason))  # fmt: skip
            record_action(session, actor=actor, action="queue.pause", target=f"queue:{family}",
                          reason=reason, detail={"already_paused": already})  # fmt: skip
        self._broadcast("platform_pause", queue=family)

    def resume(self, queue: str, *, actor: str, reason: str | None = None) -> None:
        """Let the workers that consumed ``queue`` before it was paused consume it again."""
        family = self._family(queue)
        with self.sessions.begin() as session:
            pause = session.get(QueuePause, family)
            if pause is not None:
                session.delete(pause)
            record_action(session, actor=actor, action="queue.resume", target=f"queue:{family}",
                          reason=reason, detail={"was_paused": pause is not None})  # fmt: skip
        self._broadcast("platform_resume", queue=family)

    def paused(self) -> list[QueuePause]:
        """The paused queues, in the order they were paused."""
        with self.sessions() as session:
            return list(session.scalars(select(QueuePause).order_by(QueuePause.paused_at)).all())

    def queues(self) -> list[QueueState]:
        """Every work queue with its depth (jobs waiting in the broker) and its pause."""
        pauses = {pause.queue: pause for pause in self.paused()}
        with self.app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0.5, timeout=5)
            depths = queue_depths(connection, self.app.topology)
        totals = dict.fromkeys(QUEUES, 0)
        for depth in depths:
            totals[depth.queue] += depth.messages
        return [QueueState(family, totals[family], pauses.get(family)) for family in QUEUES]

    # -- housekeeping ------------------------------------------------------------------------
    def clean(self, older_than: timedelta, *, actor: str) -> int:
        """Delete jobs that ended longer than ``older_than`` ago; returns how many.

        Their events go with them, and so do cancellations older than that whose job is over.
        With a result backend, its own clean-up runs too (Celery's: results past their expiry).
        """
        cutoff = datetime.now(UTC) - older_than
        with self.sessions.begin() as session:
            deleted = JobRepository(session).delete_older_than(cutoff)
            active = select(Job.id).where(Job.state.not_in([str(s) for s in _ENDED]))
            stale = delete(JobCancellation).where(
                and_(JobCancellation.requested_at < cutoff, JobCancellation.job_id.not_in(active))
            )
            cancellations = int(getattr(session.execute(stale), "rowcount", 0))
            results = self._clean_results()
            detail = {"older_than_seconds": older_than.total_seconds(),
                      "cutoff": cutoff.isoformat(), "jobs_deleted": deleted,
                      "cancellations_deleted": cancellations, "results": results}  # fmt: skip
            record_action(session, actor=actor, action="history.clean", target="history",
                          detail=detail)  # fmt: skip
        return deleted

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _job(session: Session, job_id: str) -> Job:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id!r} in the history")
        return job

    def _family(self, queue: str) -> str:
        family = queue.removeprefix(self.app.topology.prefix)
        if family not in QUEUES:
            raise UnknownQueue(f"unknown queue {queue!r}; declared queues: {', '.join(QUEUES)}")
        return family

    def _dead_letter(self, job_id: str) -> DeadLetter | None:
        try:
            return DeadLetters(self.app, self.sessions).show(job_id)
        except DeadLetterNotFound:
            return None

    def _remove_dead_letter(self, job_id: str, new_id: str, *, actor: str) -> None:
        letters = DeadLetters(self.app, self.sessions)
        try:
            letters.purge(task_id=job_id, actor=actor, reason=f"retried as job {new_id}")
        except DeadLetterNotFound:
            logger.warning("the dead letter of %s left its queue while it was retried", job_id)

    def _clean_results(self) -> str:
        if not self.app.settings.result_backend:
            return "no result backend"
        self.app.backend.cleanup()
        return "expired results removed"

    def _broadcast(self, command: str, **arguments: Any) -> None:
        """Tell the live workers; if the broker does not answer, they learn at their recheck."""
        try:
            with self.app.connection_for_write() as connection:
                self.app.control.broadcast(command, arguments=arguments, connection=connection)
        except BROKER_ERRORS as exc:
            logger.warning(
                "%s is recorded, but the workers could not be told now (%s: %s); they apply it "
                "within TASKS_CONTROL_RECHECK_INTERVAL (%.0f s)",
                command, exc.__class__.__name__, exc, self.app.settings.control_recheck_interval,
            )  # fmt: skip


def _publish_again(task: PlatformTask, job: Job, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Queue ``job`` again as a new job that names it in ``retry_of``; the new id."""
    new_id = str(uuid.uuid4())
    headers: dict[str, Any] = {RETRY_OF_HEADER: job.id}
    for key, value in (("tenant", job.tenant), ("idempotency_key", job.idempotency_key)):
        if value is not None:
            headers[key] = value
    try:
        task.apply_async(args=args, kwargs=kwargs, task_id=new_id, priority=job.priority,
                         headers=headers)  # fmt: skip
    except InvalidPayload as exc:
        raise JobNotRetryable(f"job {job.id} cannot be retried: {exc}") from exc
    return new_id


def _payload_of(job: Job, letter: DeadLetter | None) -> tuple[list[Any], dict[str, Any]]:
    """The job's arguments: from its dead letter if there is one, else from the history."""
    body = letter.payload if letter is not None else None
    if isinstance(body, list) and len(body) >= 2:
        args, kwargs = body[0], body[1]
        if isinstance(args, list) and isinstance(kwargs, dict):
            return args, kwargs
    args, kwargs = list(job.args or []), dict(job.kwargs or {})
    hidden = sorted([*_redacted_paths(args, "args"), *_redacted_paths(kwargs)])
    if hidden:
        raise JobNotRetryable(
            f"job {job.id} cannot be retried from the history: its payload was redacted there "
            f"({', '.join(hidden[:5])}) and it is not in a dead-letter queue; submit it anew"
        )
    return args, kwargs


def _redacted_paths(value: Any, path: str = "") -> Iterator[str]:
    if isinstance(value, str) and value in _REDACTION_MARKS:
        yield path or "payload"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _redacted_paths(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _redacted_paths(item, f"{path}[{index}]")
