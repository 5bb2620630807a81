"""A thread gathering Celery events of one kind from a platform's event exchange."""

from __future__ import annotations

import threading
from typing import Any


class EventTap:
    """Celery events of one ``kind`` from the platform's event exchange, gathered in a thread."""

    def __init__(self, app: Any, kind: str) -> None:
        self.app, self.kind = app, kind
        self.seen: list[dict[str, Any]] = []
        #: messages of job events received (one may carry many: Celery's ``task-multi``)
        self.messages = 0
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        tap = self

        class Receiver(self.app.events.Receiver):  # type: ignore[misc, name-defined]
            def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
                super().on_consume_ready(*args, **kwargs)
                tap.ready.set()

            def _receive(self, body: Any, message: Any, *args: Any, **kwargs: Any) -> None:
                events = body if isinstance(body, list) else [body]
                if any(str(e.get("type", "")).startswith("task-") for e in events):
                    tap.messages += 1
                super()._receive(body, message, *args, **kwargs)

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
