"""Reconciliation of the history with the broker: find jobs that are nowhere, queue them again.

The history says a job is ``queued``, ``started`` or ``retrying``; the broker or a worker should
then hold it (:mod:`tasks_platform.holdings`). A job that neither holds is **lost**: a message
deleted behind the platform's back, a Redis that restarted without persistence, a publish that
never reached the broker, a worker that died with the embedded broker ... :class:`Reconciler`
finds them and, when told to (``fix=True``), queues them again::

    report = Reconciler(app, sessions).run(older_than=timedelta(minutes=5), fix=True,
                                           actor="ops:ana")

How a job is judged:

1. *candidates*: jobs in those states whose history row has not moved for ``older_than``
   (the grace period: a job being published or picked up is never judged mid-flight);
2. a first look everywhere; the jobs not found are looked for again after ``confirm_delay``
   seconds, and only those still nowhere *and* whose history row is unchanged are lost
   (a job moving between a queue and a worker is seen at least once by one of the looks);
3. a job of a queue that could not be fully seen (too deep, or consumed by a worker that did
   not answer) is ``unknown``, never lost;
4. a lost job submitted through the outbox (:mod:`tasks_platform.outbox`) has its complete
   message there, the source of truth: its outbox row is made pending again (with the new
   replay count) and the relay publishes it. Any other lost job is rebuilt from its history
   row: same id, job type, payload, priority, tenant and idempotency key. It cannot be when
   the history redacted part of its payload (secrets are not kept there), when its job type is
   not declared here, when it is a workflow step (the rest of its workflow travelled in its
   message) or when an operator cancelled it: it is then ``unrecoverable`` and reported, never
   sent with a wrong payload.

Fixing is idempotent and safe to run twice or concurrently: each lost job is first *claimed*
in the history, a compare-and-set on its row's progress that writes a ``queued`` transition
(detail ``{"reconciled": true}``) and bumps the row's replay count, and only the reconciler
whose claim succeeded publishes it. A second run finds the job in its queue. The new message
carries the bumped replay count (as a dead-letter replay does), so the job's next transitions
move its row forward; its attempts start again from one. One audit entry (``jobs.reconcile``)
lists what was queued again and what could not be. Jobs waiting in the outbox (accepted, not
yet published) are held, not lost: the relay's business. Other places that may hold jobs plug
in as :data:`~tasks_platform.holdings.Holder` callables (``holders=``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.audit import record_action
from tasks_platform.errors import PlatformError
from tasks_platform.history.models import Job, JobCancellation, JobState, OutboxMessage
from tasks_platform.history.redaction import REDACTED
from tasks_platform.history.repository import as_utc
from tasks_platform.history.writer import Transition, apply_transitions
from tasks_platform.holdings import (
    DEFAULT_INSPECT_TIMEOUT,
    DEFAULT_MAX_SCAN,
    Holder,
    Stock,
    check_supported,
    take_stock,
)
from tasks_platform.jobs.declaration import REPLAYS_HEADER, RETRY_OF_HEADER, PlatformTask
from tasks_platform.outbox.store import CHANNEL
from tasks_platform.stats import BROKER_ERRORS

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)

#: states in which the broker or a worker must hold a job
OPEN_STATES = (JobState.QUEUED, JobState.STARTED, JobState.RETRYING)
#: jobs judged per run at most (the longest idle first)
DEFAULT_LIMIT = 10_000
#: seconds between the first look and the confirming one
CONFIRM_DELAY = 2.0
#: header marking a message the reconciler sent (monitoring, logs)
RECONCILED_HEADER = "x-tasks-reconciled"
_REDACTION_MARKS = frozenset({REDACTED, "[too deep]"})
_REPLAY_STEP = 100_000  # see history.models.progress


class Verdict(StrEnum):
    """What the reconciler concluded about one job."""

    LOST = "lost"  #: nowhere; can be queued again (run with fix)
    UNRECOVERABLE = "unrecoverable"  #: nowhere, and cannot be rebuilt from the history
    UNKNOWN = "unknown"  #: its queue could not be fully seen
    REQUEUED = "requeued"  #: was lost, queued again now
    SKIPPED = "skipped"  #: was lost, but its row moved meanwhile (another reconciler?)
    FAILED = "failed"  #: was lost; queueing it again failed (tried again on the next run)


@dataclass(frozen=True)
class Finding:
    """One job that is not where the history says it should be."""

    id: str
    name: str | None
    queue: str | None
    state: str
    idle_seconds: float
    verdict: Verdict
    reason: str | None = None
    #: where a lost job is rebuilt from: "history" (its row) or "outbox" (its whole message)
    source: str = "history"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "queue": self.queue, "state": self.state,
                "idle_seconds": round(self.idle_seconds, 3), "verdict": self.verdict.value,
                "reason": self.reason, "source": self.source}  # fmt: skip


@dataclass(frozen=True)
class Report:
    """What one run found: the jobs judged, how many were held, and the findings."""

    older_than: float
    checked: int
    held: int
    findings: list[Finding] = field(default_factory=list)
    blind: dict[str, str] = field(default_factory=dict)
    workers: tuple[str, ...] = ()
    fixed: bool = False

    def count(self, verdict: Verdict) -> int:
        return sum(1 for finding in self.findings if finding.verdict is verdict)

    @property
    def unresolved(self) -> int:
        """Jobs lost that are still not queued (an operator should look)."""
        settled = (Verdict.UNKNOWN, Verdict.REQUEUED, Verdict.SKIPPED)
        return sum(1 for finding in self.findings if finding.verdict not in settled)

    def as_dict(self) -> dict[str, Any]:
        counts = {verdict.value: self.count(verdict) for verdict in Verdict}
        return {"older_than_seconds": self.older_than, "checked": self.checked,
                "held": self.held, "counts": counts, "fixed": self.fixed,
                "findings": [f.as_dict() for f in self.findings], "blind": self.blind,
                "workers": list(self.workers)}  # fmt: skip


@dataclass(frozen=True)
class _Seen:
    """A candidate as the history showed it when the run began."""

    id: str
    name: str | None
    queue: str | None
    state: str
    progress: int
    updated_at: datetime

    def idle(self, now: datetime) -> float:
        return (now - as_utc(self.updated_at)).total_seconds()


class Reconciler:
    """Compares the history with the broker and the workers; queues lost jobs again."""

    def __init__(
        self,
        app: PlatformCelery,
        sessions: sessionmaker[Session],
        *,
        holders: Sequence[Holder] = (),
        max_scan: int = DEFAULT_MAX_SCAN,
        inspect_timeout: float = DEFAULT_INSPECT_TIMEOUT,
        confirm_delay: float = CONFIRM_DELAY,
    ) -> None:
        self.app = app
        self.sessions = sessions
        self.holders = (self._outbox_pending, *holders)
        self.max_scan = max_scan
        self.inspect_timeout = inspect_timeout
        self.confirm_delay = confirm_delay

    def run(
        self,
        *,
        older_than: timedelta,
        fix: bool = False,
        actor: str = "reconcile",
        reason: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> Report:
        """Judge the open jobs idle for ``older_than``; with ``fix``, queue the lost ones again."""
        check_supported(self.app)
        now = datetime.now(UTC)
        candidates = self._candidates(now - older_than, limit)
        if not candidates:
            return Report(older_than.total_seconds(), 0, 0, fixed=fix)
        first = self._look(candidates)
        missing = {i: seen for i, seen in candidates.items() if i not in first.held}
        stock = first
        if missing:
            time.sleep(self.confirm_delay)
            stock = self._look(missing)
            missing = self._unchanged({i: s for i, s in missing.items() if i not in stock.held})
        blind = {**first.blind, **stock.blind}
        findings = [self._judge(seen, now, blind) for seen in missing.values()]
        if fix:
            findings = self._fix(findings, missing, actor=actor, reason=reason)
        held = len(candidates) - len(missing)
        return Report(older_than.total_seconds(), len(candidates), held, findings, blind,
                      stock.workers, fixed=fix)  # fmt: skip

    # -- looking -------------------------------------------------------------------------------
    def _outbox_pending(self, candidates: frozenset[str]) -> dict[str, str]:
        """Candidates waiting in the outbox: the relay's business, not lost."""
        if not candidates:
            return {}
        query = select(OutboxMessage.id).where(
            OutboxMessage.id.in_(sorted(candidates)), OutboxMessage.published_at.is_(None)
        )
        with self.sessions() as session:
            return dict.fromkeys(session.scalars(query), "outbox")

    def _candidates(self, cutoff: datetime, limit: int) -> dict[str, _Seen]:
        query = (
            select(Job.id, Job.name, Job.queue, Job.state, Job.progress, Job.updated_at)
            .where(Job.state.in_([s.value for s in OPEN_STATES]), Job.updated_at < cutoff)
            .order_by(Job.updated_at)
            .limit(limit)
        )
        with self.sessions() as session:
            return {row.id: _Seen(*row) for row in session.execute(query)}

    def _look(self, candidates: dict[str, _Seen]) -> Stock:
        return take_stock(self.app, max_scan=self.max_scan, inspect_timeout=self.inspect_timeout,
                          holders=self.holders, candidates=frozenset(candidates))  # fmt: skip

    def _unchanged(self, missing: dict[str, _Seen]) -> dict[str, _Seen]:
        """The candidates whose history row did not move since the run began."""
        if not missing:
            return {}
        query = select(Job.id, Job.state, Job.progress).where(Job.id.in_(list(missing)))
        with self.sessions() as session:
            now = {row.id: (row.state, row.progress) for row in session.execute(query)}
        return {i: s for i, s in missing.items() if now.get(i) == (s.state, s.progress)}

    def _judge(self, seen: _Seen, now: datetime, blind: dict[str, str]) -> Finding:
        finding = Finding(seen.id, seen.name, seen.queue, seen.state, seen.idle(now), Verdict.LOST)
        if seen.queue in blind:
            return replace(finding, verdict=Verdict.UNKNOWN, reason=blind[seen.queue])
        with self.sessions() as session:
            job = session.get(Job, seen.id)
            cancelled = session.get(JobCancellation, seen.id) is not None
            in_outbox = session.get(OutboxMessage, seen.id) is not None
        if job is not None and in_outbox and not cancelled:
            return replace(finding, source="outbox")
        why = "its history row is gone" if job is None else self._unrebuildable(job, cancelled)
        if why is not None:
            return replace(finding, verdict=Verdict.UNRECOVERABLE, reason=why)
        return finding

    def _unrebuildable(self, job: Job, cancelled: bool) -> str | None:
        """Why ``job`` cannot be queued again from its history row (None: it can)."""
        if cancelled:
            return "an operator cancelled it: not queued again"
        if not isinstance(self.app.tasks.get(job.name or ""), PlatformTask):
            return f"its job type {job.name!r} is not declared here"
        if job.group_id or job.parent_id or (job.root_id and job.root_id != job.id):
            return "a workflow step: the rest of its workflow travelled in its message"
        hidden = sorted({*_redacted(job.args or [], "args"), *_redacted(job.kwargs or {})})
        if hidden:
            return f"its payload was redacted in the history ({', '.join(hidden[:5])})"
        return None

    # -- fixing --------------------------------------------------------------------------------
    def _fix(self, findings: list[Finding], seen: dict[str, _Seen], *, actor: str,
             reason: str | None) -> list[Finding]:  # fmt: skip
        fixed = [self._requeue(f, seen[f.id], actor) if f.verdict is Verdict.LOST else f
                 for f in findings]  # fmt: skip
        judged = [f for f in fixed if f.verdict is not Verdict.UNKNOWN]
        if judged:
            self._audit(judged, actor=actor, reason=reason)
        return fixed

    def _requeue(self, finding: Finding, seen: _Seen, actor: str) -> Finding:
        replays = max(seen.progress, 0) // _REPLAY_STEP + 1
        try:
            job, via_outbox = self._claim(seen, replays, actor)
        except SQLAlchemyError as exc:
            logger.exception("could not claim lost job %s", seen.id)
            return replace(finding, verdict=Verdict.FAILED, reason=f"history: {exc}"[:300])
        if job is None:
            return replace(finding, verdict=Verdict.SKIPPED,
                           reason="its history row moved meanwhile")  # fmt: skip
        if via_outbox:
            logger.warning("lost job %s[%s] handed back to the outbox relay", job.name, job.id)
            return replace(finding, verdict=Verdict.REQUEUED, reason="through the outbox relay")
        try:
            _publish(self.app.tasks[job.name or ""], job, replays)
        except (PlatformError, *BROKER_ERRORS) as exc:  # type: ignore[misc]
            logger.exception("lost job %s was claimed but could not be queued again", job.id)
            text = f"{exc.__class__.__name__}: {exc}"[:300]
            return replace(finding, verdict=Verdict.FAILED, reason=text)
        logger.warning("lost job %s[%s] (%s) queued again", job.name, job.id, seen.state)
        return replace(finding, verdict=Verdict.REQUEUED)

    def _claim(self, seen: _Seen, replays: int, actor: str) -> tuple[Job | None, bool]:
        """Move the row to ``queued`` (next replay) if it is still as seen: the row (None if it
        moved), and whether the job's outbox row was made pending again for the relay."""
        with self.sessions.begin() as session:
            moved = session.execute(
                update(Job)
                .where(Job.id == seen.id, Job.progress == seen.progress, Job.state == seen.state)
                .values(updated_at=datetime.now(UTC)),
                execution_options={"synchronize_session": False},
            )
            if getattr(moved, "rowcount", 0) != 1:
                return None, False
            detail = {"reconciled": True, "was": seen.state, "actor": actor}
            apply_transitions(session, [Transition(seen.id, JobState.QUEUED, 1, time.time(),
                                                   replays=replays, detail=detail)])  # fmt: skip
            via_outbox = _back_to_the_outbox(session, seen.id, replays)
            job = session.get(Job, seen.id)
            if job is not None:
                session.expunge(job)
            return job, via_outbox

    def _audit(self, findings: list[Finding], *, actor: str, reason: str | None) -> None:
        detail: dict[str, Any] = {v.value: [f.id for f in findings if f.verdict is v][:1000]
                                  for v in Verdict if v is not Verdict.UNKNOWN}  # fmt: skip
        try:
            with self.sessions.begin() as session:
                record_action(session, actor=actor, action="jobs.reconcile", target="jobs",
                              reason=reason, detail=detail)  # fmt: skip
        except SQLAlchemyError:
            logger.exception("reconcile by %s is done but not in the audit log: %s", actor, detail)
            raise


def _back_to_the_outbox(session: Session, job_id: str, replays: int) -> bool:
    """Make the job's outbox row (if it has one) pending again, for the relay to publish.

    The outbox keeps the complete message (nothing redacted): it is the source of truth. The
    message gets the new replay count, and the row forgets the delivery it recorded, so that
    the worker taking the new publish does not discard it as a duplicate.
    """
    row = session.get(OutboxMessage, job_id)
    if row is None:
        return False
    message = dict(row.message)
    options = dict(message.get("options") or {})
    options["headers"] = {**(options.get("headers") or {}), REPLAYS_HEADER: replays,
                          RECONCILED_HEADER: "1"}  # fmt: skip
    message["options"] = options
    row.message, row.published_at, row.delivered_by = message, None, None
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(CHANNEL, "")))  # wakes the relays at commit
    return True


def _publish(task: PlatformTask, job: Job, replays: int) -> None:
    """Send ``job`` again: same id, payload, priority, tenant and key; the new replay count."""
    headers: dict[str, Any] = {REPLAYS_HEADER: replays, RECONCILED_HEADER: "1"}
    if job.idempotency_key is not None:
        headers["idempotency_key"] = job.idempotency_key
    if job.retry_of is not None:
        headers[RETRY_OF_HEADER] = job.retry_of
    options: dict[str, Any] = {"task_id": job.id, "priority": job.priority, "headers": headers}
    if job.tenant is not None:
        options["tenant"] = job.tenant
    task.apply_async(args=list(job.args or []), kwargs=dict(job.kwargs or {}), **options)


def _redacted(value: Any, path: str = "") -> Iterator[str]:
    """Paths in ``value`` where the history wrote a redaction mark instead of the value."""
    if isinstance(value, str) and value in _REDACTION_MARKS:
        yield path or "payload"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _redacted(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _redacted(item, f"{path}[{index}]")


def lost_ids(report: Report, verdicts: Iterable[Verdict] = (Verdict.LOST,)) -> list[str]:
    """The ids of ``report``'s findings with one of ``verdicts``."""
    wanted = set(verdicts)
    return [finding.id for finding in report.findings if finding.verdict in wanted]
