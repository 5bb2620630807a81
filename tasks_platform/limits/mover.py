"""The mover: a worker thread that publishes deferred jobs when their time comes.

Every worker of a platform with tenant limits runs one; they share the deferred set safely.
Every ``POLL`` seconds (at once again after a full batch) it claims up to ``BATCH`` due jobs
(each claim lasts ``MOVE_LEASE`` seconds), publishes them to their queues marked paced (so
they are not paced twice), then drops them from the set. Delivery is at least once: a mover
that dies after publishing and before dropping leaves the jobs to be published again when the
claim runs out, with the same ids (the history counts one job; bodies with side effects take
an idempotency key). A publish that fails puts the rest of the batch back, due in a second.

The mover publishes on a broker connection of its own, never the app's pool (see
``deadletter.publish``: prefork pool processes close inherited pooled connections).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, cast

from celery import bootsteps

from tasks_platform.errors import LimitsUnavailable
from tasks_platform.limits import admission
from tasks_platform.limits.store import PACED_HEADER, job_of, limits_for

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)

#: seconds between two looks at the deferred set
POLL = 0.05
#: deferred jobs claimed at a time
BATCH = 100
#: seconds to wait after Redis or the broker failed
BACKOFF = 1.0


class DeferredMover(bootsteps.StartStopStep):  # type: ignore[misc]
    """Publishes due deferred jobs (see the module docstring); only with tenant limits."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.app = cast("PlatformCelery", c.app)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None

    def include_if(self, c: Any) -> bool:
        return bool(self.app.settings.tenant_limits)

    def start(self, c: Any) -> None:
        admission.install(self.app, c.timer)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tenant-limits-mover",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def stop(self, c: Any) -> None:
        """Nothing to do: the thread keeps going across a reconnection."""

    def shutdown(self, c: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    moved = self.move_once()
                except Exception:
                    logger.exception("could not move deferred jobs; trying again in %.0f s",
                                     BACKOFF)  # fmt: skip
                    self._close()
                    self._stop.wait(BACKOFF)
                    continue
                if moved < BATCH:
                    self._stop.wait(POLL)
        finally:
            self._close()

    def move_once(self) -> int:
        """Publish the jobs due now (up to ``BATCH``); how many were claimed."""
        limits = limits_for(self.app.settings)
        try:
            members = limits.take_due(BATCH)
        except LimitsUnavailable as exc:
            logger.error("%s; deferred jobs wait until it answers", exc)
            self._stop.wait(BACKOFF)
            return 0
        if not members:
            return 0
        published: list[str] = []
        try:
            producer = self._producer()
            for member in members:
                self._publish(member, producer)
                published.append(member)
        except Exception:
            rest = members[len(published) :]
            logger.exception("could not publish %d deferred job(s); due again in %.0f s",
                             len(rest), BACKOFF)  # fmt: skip
            limits.put_back(rest, BACKOFF)
            self._close()
        finally:
            limits.forget(published)
        return len(members)

    def _publish(self, member: str, producer: Any) -> None:
        signature = self.app.signature(job_of(member))
        headers = dict(signature.options.get("headers") or {})
        headers[PACED_HEADER] = "1"
        signature.options["headers"] = headers
        signature.apply_async(producer=producer)

    def _producer(self) -> Any:
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        return self._connection.Producer()

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                logger.warning("could not close the mover's broker connection", exc_info=True)
