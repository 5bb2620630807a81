"""The worker's side of control: paused queues and cancelled jobs, durably.

Celery pauses a queue (``cancel_consumer``) and cancels a job (``revoke``) in the memory of the
workers that are running at that moment: a worker started later consumes the queue and runs the
job. Here the history database is the truth (:class:`~tasks_platform.history.models.QueuePause`
and :class:`~tasks_platform.history.models.JobCancellation` rows, written by
:class:`tasks_platform.control.Control`) and every worker follows it:

* when its consumer starts (before it takes any message), :class:`WorkerControl` reads the
  store, stops consuming the paused queues among its own and puts the outstanding cancellations
  into Celery's revoked set, so that a cancelled job is discarded (and recorded ``cancelled``);
* live workers hear about each change at once through the broadcast commands below;
* every ``control_recheck_interval`` seconds a thread re-reads the store, so that a worker that
  missed a broadcast (reconnecting, say) catches up.

A resumed queue is consumed again only by the workers that consumed it before it was paused
(a worker started with ``-Q ai,email`` never starts consuming ``payments``). If the database
cannot be read when a worker starts, the worker starts anyway (jobs are not held hostage by the
history) and logs it; the recheck applies the store once it answers.

Broadcast commands (``app.control.broadcast(name, arguments=...)``): ``platform_pause`` and
``platform_resume`` (``queue``: a family such as ``"email"``) and ``platform_cancel``
(``job_id``: revoke it and, where the pool can, terminate it if it is running here).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from celery import bootsteps
from celery.concurrency.base import BasePool
from celery.worker import state as worker_state
from celery.worker.control import control_command, ok
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tasks_platform.cancellation import CONNECT_TIMEOUT, outstanding, store_engine
from tasks_platform.history.models import QueuePause
from tasks_platform.history.recorder import prepare_embedded_database

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Desired:
    """What the store says: the paused families and the outstanding cancellations."""

    paused: frozenset[str]
    cancelled: tuple[str, ...]


class WorkerControl(bootsteps.StartStopStep):  # type: ignore[misc]
    """Follows the durable pauses and cancellations (see the module docstring)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.consumer = c
        #: the families this worker consumes when nothing is paused
        self.assigned: frozenset[str] | None = None
        #: the families this worker stopped consuming because they are paused
        self.paused: set[str] = set()
        self._engine: Engine | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        c.platform_control = self

    @property
    def app(self) -> PlatformCelery:
        return cast("PlatformCelery", self.consumer.app)

    # -- the bootstep ------------------------------------------------------------------------
    def start(self, c: Any) -> None:
        if self.assigned is None:  # the first start; a restart after a connection loss keeps it
            names = c.app.amqp.queues.consume_from
            self.assigned = frozenset(
                family for name in names if (family := self.app.topology.family_of(name))
            )
            # Celery forgets revoked ids after 3 hours; a cancellation lasts its retention
            retention = self.app.settings.cancel_retention
            worker_state.revoked.expires = max(worker_state.revoked.expires, retention)
        desired = self.read(first=True)
        if desired is not None:
            self.apply(desired)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._recheck, name="platform-control-recheck", daemon=True
            )
            self._thread.start()

    def stop(self, c: Any) -> None:
        """Nothing to do: the pauses stay applied across a reconnection."""

    def shutdown(self, c: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CONNECT_TIMEOUT + 1)
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- reading and applying the store --------------------------------------------------------
    def read(self, *, first: bool = False) -> Desired | None:
        """The store's pauses and cancellations, or None (logged) when it cannot be read."""
        settings = self.app.settings
        since = datetime.now(UTC) - timedelta(seconds=settings.cancel_retention)
        try:
            if first and settings.effective_database_url.startswith("sqlite"):
                prepare_embedded_database(settings)
            with Session(self._connect()) as session:
                paused = frozenset(session.scalars(select(QueuePause.queue)).all())
                cancelled = tuple(outstanding(session, since=since))
        except Exception as exc:
            logger.warning(
                "cannot read queue pauses and cancellations from the history database (%s: %s); "
                "retrying every %.0f s",
                exc.__class__.__name__,
                " ".join(str(exc).split())[:200],
                settings.control_recheck_interval,
            )
            return None
        return Desired(paused=paused, cancelled=cancelled)

    def apply(self, desired: Desired) -> None:
        """Make this worker follow ``desired`` (in the consumer's thread)."""
        worker_state.revoked.update(desired.cancelled)
        assigned = self.assigned or frozenset()
        for family in sorted((assigned & desired.paused) - self.paused):
            self.pause(family)
        for family in sorted(self.paused - desired.paused):
            self.resume(family)

    def pause(self, family: str) -> str:
        if family not in (self.assigned or ()):
            return f"not consuming {family}"
        if family in self.paused:
            return f"{family} already paused"
        name = self.app.topology.queue_name(family)
        if self.consumer.task_consumer is None:
            self.app.amqp.queues.deselect(name)  # the next consumer will not take it
        else:
            self.consumer.cancel_task_queue(name)
        self.paused.add(family)
        logger.warning("queue %s is paused: not consuming it until it is resumed", family)
        return f"paused {family}"

    def resume(self, family: str) -> str:
        if family not in self.paused:
            return f"{family} was not paused here"
        self.consumer.add_task_queue(self.app.topology.queue_name(family))
        self.paused.discard(family)
        logger.warning("queue %s is resumed: consuming it again", family)
        return f"resumed {family}"

    def _connect(self) -> Engine:
        if self._engine is None:
            self._engine = store_engine(self.app.settings, connections=2)
        return self._engine

    def _recheck(self) -> None:
        interval = self.app.settings.control_recheck_interval
        while not self._stop.wait(interval):
            desired = self.read()
            if desired is not None:
                # call_soon is thread-safe: the consumer's thread applies it between messages
                self.consumer.call_soon(self.apply, desired)


# -- the broadcast commands ----------------------------------------------------------------------
def _step(state: Any) -> WorkerControl | None:
    return getattr(state.consumer, "platform_control", None)


def platform_pause(state: Any, queue: str, **_: Any) -> dict[str, str]:
    """Stop consuming ``queue`` (a family) if this worker consumes it."""
    step = _step(state)
    if step is None:
        return {"error": "this worker does not follow queue pauses"}
    state.consumer.call_soon(step.pause, queue)
    return cast("dict[str, str]", ok(f"pausing {queue}"))


def platform_resume(state: Any, queue: str, **_: Any) -> dict[str, str]:
    """Consume ``queue`` again if this worker paused it."""
    step = _step(state)
    if step is None:
        return {"error": "this worker does not follow queue pauses"}
    state.consumer.call_soon(step.resume, queue)
    return cast("dict[str, str]", ok(f"resuming {queue}"))


def platform_cancel(state: Any, job_id: str, **_: Any) -> dict[str, str]:
    """Revoke ``job_id``; terminate it if it runs here and the pool can (prefork)."""
    worker_state.revoked.add(job_id)
    pool = state.consumer.pool
    for request in list(worker_state.active_requests):
        if request.id != job_id:
            continue
        if not can_terminate(pool):
            return cast("dict[str, str]", ok(f"{job_id} is running: asked to stop"))
        logger.warning("terminating cancelled job %s", job_id)
        request.terminate(pool, signal=signal.SIGTERM)
        return cast("dict[str, str]", ok(f"{job_id} terminated"))
    return cast("dict[str, str]", ok(f"{job_id} revoked"))


def can_terminate(pool: Any) -> bool:
    """True if ``pool`` can stop one running job (prefork can; threads and solo cannot)."""
    method = getattr(pool, "terminate_job", None)
    return method is not None and getattr(method, "__func__", None) is not BasePool.terminate_job


control_command(args=[("queue", str)], signature="<queue>")(platform_pause)
control_command(args=[("queue", str)], signature="<queue>")(platform_resume)
control_command(args=[("job_id", str)], signature="<job_id>")(platform_cancel)
