"""A thread gathering Celery events of one kind from a platform's event exchange."""

from __future__ import annotations

import threading
from typing import Any


class EventTap:
    """Celery events of one ``kind`` from the platform's event exchange, gathered in a thread."""

    def __init__(self, app: Any, kind: str) -> None:
        self.app, self.kind = app, kind
        self.seen: list[dict[str, Any]] = []
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        ready = self.ready

        class Receiver(self.app.events.Receiver):  # type: ignore[misc, name-defined]
            def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
                super().on_consume_ready(*args, **kwargs)
                ready.set()

        with self.app.connection_for_read() as connection:
            receiver = Receiver(connection, handlers={self.kind: self.seen.append})
            for _ in receiver.consume(limit=None, timeout=None, wakeup=False, safety_interval=0.2):
                if self.stop.is_set():
                    break
            receiver.should_stop = True

    def __enter__(self) -> EventTap:
        self.thread.start()
        assert self.ready.wait(15), "the event receiver did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)
