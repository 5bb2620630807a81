"""A worker's liveness file: touched while the worker consumes, for cheap health probes.

With ``TASKS_WORKER_LIVENESS_FILE`` set, the worker touches that file every
``TASKS_WORKER_LIVENESS_INTERVAL`` seconds from its consumer's own timer, and only while the
consumer runs: from the moment it consumes from the broker until the connection is lost (the
consumer stops its steps then, and starts them again once it has reconnected) or the worker
shuts down (the file is removed). A stuck event loop stops the touches too, since the timer
runs in it.

So a probe only compares the file's age with a few intervals; it runs no Python and does not
talk to the broker (``celery inspect ping`` would, for every probe of every worker)::

    f=$TASKS_WORKER_LIVENESS_FILE; [ -f "$f" ] && [ $(( $(date +%s) - $(stat -c %Y "$f") )) -lt 60 ]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import bootsteps

logger = logging.getLogger(__name__)


class WorkerLiveness(bootsteps.StartStopStep):  # type: ignore[misc]
    """Touches the liveness file while the consumer consumes (see the module docstring)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        settings = c.app.settings
        self.path: Path | None = settings.worker_liveness_file
        self.interval: float = settings.worker_liveness_interval
        self._entry: Any = None
        if self.path is not None:
            # a file left by an earlier run of this worker must not pass for this one
            self.remove()

    def start(self, c: Any) -> None:
        if self.path is None:
            return
        self.touch()
        self._entry = c.timer.call_repeatedly(self.interval, self.touch)

    def stop(self, c: Any) -> None:
        """The connection is lost (or the worker stops): the file goes stale."""
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        self.remove()

    def touch(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()  # creates it, or sets its modification time to now
        except OSError as exc:
            logger.warning("cannot touch the liveness file %s: %s", self.path, exc)

    def remove(self) -> None:
        if self.path is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove the liveness file %s: %s", self.path, exc)
