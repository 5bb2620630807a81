"""The event sender: a worker's job events published from a thread of its own (Redis).

Celery buffers a worker's job events (``task-received``, ``-started``, ``-succeeded`` ...) and
publishes the buffer on the next turn of its event loop, in the loop's own thread: one
``PUBLISH`` per turn, about three per short job, and the loop waits for each reply before it
takes the next job. On Redis the worker's consumer hands that flush to an :class:`EventSender`
instead: the loop goes on at once, and the events buffered while a publish is on its way go
out together in the next one (Celery's ``task-multi`` message, a list of events, which every
event receiver reads). A woken sender publishes at once, then lets ``interval`` seconds
(``TASKS_EVENT_FLUSH_INTERVAL``) pass before its next publish: under load one message carries
the events of many jobs, and monitors see an event at most that much later. Celery publishes
its buffer itself when it holds ``buffer_limit`` events (24): the consumer raises that limit to
:data:`BUFFER_LIMIT`, so that the loop's thread does not publish in the sender's stead.

Events are monitoring, not delivery: a publish that fails is kept in Celery's outbound buffer
and sent again after the consumer reconnects, as before. The sender's last flush happens when
the consumer shuts down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: the most events Celery's buffer holds before the loop's thread publishes them itself
BUFFER_LIMIT = 1000


class EventSender:
    """Calls ``flush`` in a thread of its own when woken, at most once per ``interval``."""

    def __init__(self, flush: Callable[[], None], *, interval: float) -> None:
        self._flush = flush
        self._interval = interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-events", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Publish what is buffered: now if the sender is idle, else once its interval is up."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopped.is_set():
                return
            self._flush_logged()
            if self._interval > 0 and self._stopped.wait(self._interval):
                return

    def _flush_logged(self) -> None:
        try:
            self._flush()
        except Exception:  # the events stay buffered; the next wake tries again
            logger.exception("could not publish the worker's job events")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and publish, here, what is still buffered."""
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout)
        self._flush_logged()
