"""The relay: publishes the jobs committed to the outbox, and the worker bootstep that runs it.

Each round takes up to ``outbox_batch_size`` pending rows, oldest first, with ``SELECT ... FOR
UPDATE SKIP LOCKED`` (so several relays share the work and never take the same row), publishes
each with publisher confirms (RabbitMQ: ``confirm_publish``; Redis: the ``LPUSH`` reply), then,
in the same transaction, marks them published and records their ``queued`` transition in the
history. A relay that dies before that commit leaves its rows pending: the next relay publishes
them again (at least once). Each publish carries a fresh id in the ``x-tasks-outbox`` header;
the worker runs a job for the first publish it sees and acknowledges any other publish of the
same job without running it (:func:`~tasks_platform.outbox.store.claim_delivery`), so
duplicates collapse by task id.

On PostgreSQL the relay LISTENs for the ``NOTIFY`` the submitting transaction sends at commit,
so it publishes within milliseconds; it also polls every ``outbox_poll_interval`` seconds in
case a notification was missed (the only way on SQLite). While the broker (or the database)
is unavailable it backs off exponentially, up to :data:`MAX_BACKOFF` seconds, and says so in
the log once when it starts failing and once when it recovers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from celery import bootsteps
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import JobState, OutboxMessage
from tasks_platform.history.recorder import prepare_embedded_database
from tasks_platform.history.writer import Transition, apply_transitions
from tasks_platform.outbox.store import (
    CHANNEL,
    OUTBOX_HEADER,
    claim,
    mark_published,
    note_failure,
    prune,
)

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)

#: the first and the longest wait after a failed round (seconds)
MIN_BACKOFF = 0.2
MAX_BACKOFF = 5.0
#: seconds to wait for the broker's confirmation of one publish
CONFIRM_TIMEOUT = 10.0
#: longest wait for a notification before checking whether the relay is being stopped
STOP_CHECK = 1.0
#: seconds between two prunings of old published rows
PRUNE_EVERY = 3600.0


class PublishFailed(Exception):
    """A round published part of its batch (committed) and then failed (the rest is pending)."""


@dataclass
class RelayStats:
    """What a relay did since it started."""

    published: int = 0
    rounds: int = 0
    failures: int = 0


class Relay:
    """Publishes pending outbox rows of ``app`` (see the module docstring); not thread-safe."""

    def __init__(self, app: PlatformCelery, *, batch_size: int | None = None) -> None:
        self.app = app
        self.settings = app.settings
        self.batch_size = batch_size or self.settings.outbox_batch_size
        self.stats = RelayStats()
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._connection: Any = None
        self._listener: _Listener | None = None
        self._next_prune = time.monotonic()

    # -- one round ---------------------------------------------------------------------------
    def publish_once(self) -> int:
        """Publish one batch; how many rows were published. PublishFailed (after committing
        what was published) or a database error when the round failed."""
        error: BaseException | None = None
        with self._session_factory().begin() as session:
            rows = claim(session, self.batch_size)
            if not rows:
                return 0
            done: list[OutboxMessage] = []
            try:
                producer = self._producer()
                for row in rows:
                    self._publish(producer, row)
                    done.append(row)
            except Exception as exc:  # the broker: keep the rest pending, say why
                error = exc
                self._close_broker()
                note_failure(session, [r.id for r in rows[len(done) :]], _describe(exc))
            self._mark(session, done)
        self.stats.rounds += 1
        self.stats.published += len(done)
        if error is not None:
            raise PublishFailed(_describe(error)) from error
        return len(done)

    def drain(self) -> int:
        """Publish rounds until no row is pending; how many were published."""
        total = 0
        while True:
            count = self.publish_once()
            total += count
            if count < self.batch_size:
                return total

    def _mark(self, session: Session, rows: list[OutboxMessage]) -> None:
        if not rows:
            return
        now = datetime.now(UTC)
        mark_published(session, [row.id for row in rows], now)
        if self.settings.history_enabled:
            at = now.timestamp()
            facts = {row.id: {"queue": self._family(row.name)} for row in rows}
            transitions = [
                Transition(r.id, JobState.QUEUED, 1, at, facts=facts[r.id]) for r in rows
            ]
            apply_transitions(session, transitions)

    def _publish(self, producer: Any, row: OutboxMessage) -> None:
        message = dict(row.message)
        options = dict(message.get("options") or {})
        headers = dict(options.pop("headers", None) or {})
        headers[OUTBOX_HEADER] = uuid.uuid4().hex  # this publish; a redelivery keeps it
        self.app.send_task(
            message["task"],
            args=message.get("args") or (),
            kwargs=message.get("kwargs") or {},
            task_id=message.get("id") or row.id,
            producer=producer,
            headers=headers,
            retry=False,  # the relay's own backoff retries; a row is never given up
            confirm_timeout=CONFIRM_TIMEOUT,
            **options,
        )

    def _family(self, name: str) -> str | None:
        task = self.app.tasks.get(name)
        return cast("str | None", getattr(task, "family", None))

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set: drain, then wait for a notification or the poll."""
        delay = 0.0
        try:
            while not stop.is_set():
                if delay:
                    stop.wait(delay)
                    if stop.is_set():
                        return
                try:
                    self.drain()
                    self._maybe_prune()
                except Exception as exc:
                    delay = self._failed(exc, delay)
                    continue
                if delay:
                    logger.warning("outbox relay: publishing again after %d failed round(s)",
                                   self.stats.failures)  # fmt: skip
                    delay = 0.0
                self._wait(stop)
        finally:
            self.close()

    def _failed(self, exc: BaseException, delay: float) -> float:
        self.stats.failures += 1
        delay = min(max(delay * 2, MIN_BACKOFF), MAX_BACKOFF)
        first = delay <= MIN_BACKOFF
        where = "broker" if isinstance(exc, PublishFailed) else "database"
        if first or self.stats.failures % 50 == 0:
            logger.error("outbox relay: the %s is unavailable (%s); jobs stay pending in the "
                         "outbox, retrying every %.1f s at most", where, _describe(exc),
                         MAX_BACKOFF)  # fmt: skip
        if where == "database":
            self._close_database()
        return delay

    def _wait(self, stop: threading.Event) -> None:
        interval = self.settings.outbox_poll_interval
        listener = self._listening()
        if listener is None:
            stop.wait(interval)
            return
        deadline = time.monotonic() + interval
        while not stop.is_set():  # in slices, so that stopping never waits a whole poll
            left = deadline - time.monotonic()
            if left <= 0:
                return
            woken = listener.wait(min(left, STOP_CHECK))
            if woken is None:
                self._listener = None  # its connection broke: poll, and listen again next time
                return
            if woken:
                return

    def _listening(self) -> _Listener | None:
        url = self.settings.effective_database_url
        if self._listener is None and url.startswith("postgresql"):
            try:
                self._listener = _Listener(url)
            except Exception as exc:
                logger.warning("outbox relay: cannot LISTEN (%s); polling", _describe(exc))
        return self._listener

    def _maybe_prune(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY
        with self._session_factory().begin() as session:
            removed = prune(session, older_than=timedelta(seconds=self.settings.outbox_retention))
        if removed:
            logger.info("outbox relay: pruned %d published row(s)", removed)

    # -- connections -------------------------------------------------------------------------
    def _session_factory(self) -> sessionmaker[Session]:
        if self._sessions is None:
            if self.settings.effective_database_url.startswith("sqlite"):
                prepare_embedded_database(self.settings)
            self._engine = create_history_engine(self.settings)
            self._sessions = session_factory(self._engine)
        return self._sessions

    def _producer(self) -> Any:
        if self._connection is None:  # a connection of its own (see deadletter.publish)
            connection = self.app.connection_for_write()
            try:
                # one attempt (connect() makes two): the relay's own backoff does the waiting
                connection.ensure_connection(max_retries=0)
            except Exception:
                connection.close()
                raise
            self._connection = connection
        return self._connection.Producer()

    def _close_broker(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception as exc:
                logger.debug("outbox relay: closing the broker connection: %s", exc)

    def _close_database(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        engine, self._engine, self._sessions = self._engine, None, None
        if engine is not None:
            engine.dispose()

    def close(self) -> None:
        self._close_broker()
        self._close_database()


class _Listener:
    """A PostgreSQL connection LISTENing on the outbox channel."""

    def __init__(self, url: str) -> None:
        self._engine = create_engine(url, poolclass=NullPool)
        self._raw = self._engine.raw_connection()
        driver = self._raw.driver_connection
        driver.autocommit = True  # type: ignore[union-attr]
        driver.execute(f"LISTEN {CHANNEL}")  # type: ignore[union-attr]
        self._driver: Any = driver

    def wait(self, timeout: float) -> bool | None:
        """Wait up to ``timeout`` s for a notification: True if one came, False if none, None
        if the connection broke."""
        try:
            woken = False
            for _ in self._driver.notifies(timeout=timeout, stop_after=1):
                woken = True
            if woken:  # the others that arrived meanwhile: one round for all. Not inside the
                # loop above: the generator holds the connection's (non-reentrant) lock
                for _ in self._driver.notifies(timeout=0.0):
                    pass
        except Exception as exc:
            logger.warning("outbox relay: lost the LISTEN connection (%s)", _describe(exc))
            self.close()
            return None
        return woken

    def close(self) -> None:
        try:
            self._raw.close()
        except Exception as exc:
            logger.debug("outbox relay: closing the LISTEN connection: %s", exc)
        self._engine.dispose()


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:500]


class OutboxRelay(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs a relay in the worker (``TASKS_OUTBOX_RELAY``, on by default with a history)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.app = cast("PlatformCelery", c.app)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def include_if(self, c: Any) -> bool:
        settings = self.app.settings
        return bool(settings.outbox_relay and settings.history_enabled)

    def start(self, c: Any) -> None:
        if self._thread is None:
            relay = Relay(self.app)
            self._thread = threading.Thread(target=relay.run, args=(self._stop,),
                                            name="outbox-relay", daemon=True)  # fmt: skip
            self._thread.start()

    def stop(self, c: Any) -> None:
        """Nothing to do: the relay keeps going across a reconnection of the consumer."""

    def shutdown(self, c: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
