"""Bare Celery, the baseline: a plain Celery app with its default settings (JSON), one queue.

``celery -A bare_celery worker`` reads the broker and queue from ``BENCH_BROKER_URL`` and
``BENCH_QUEUE``; the producer builds the same app with :func:`make_app`.
"""

from __future__ import annotations

import os

from celery import Celery
from stamp import record_start


def make_app(broker_url: str, queue: str) -> Celery:
    app = Celery("bare", broker=broker_url, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_serializer="json",
                    accept_content=["json"], task_ignore_result=True)  # fmt: skip

    @app.task(name="bare.noop", shared=False)
    def noop() -> None:
        """Does nothing."""

    @app.task(name="bare.stamp", shared=False)
    def stamp(to: str, key: str, sent: float) -> None:
        record_start(to, key, sent)

    return app


if "BENCH_BROKER_URL" in os.environ:  # in the worker
    app = make_app(os.environ["BENCH_BROKER_URL"], os.environ["BENCH_QUEUE"])
