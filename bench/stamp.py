"""The pickup-latency probe: a job that notes when its body started, in Redis.

``record_start(to, key, sent)`` appends ``"<sent> <started>"`` (Unix times) to the Redis list
``key`` at ``to``; the producer put ``sent`` in the payload just before publishing, so
``started - sent`` is the job's pickup latency (same machine, same clock). The platform's job
type ``bench.stamp`` (:mod:`platform_stamp`) and the bare Celery app's ``bare.stamp``
(:mod:`bare_celery`) both call it. Nothing of the platform is imported here: the bare Celery
worker's memory stays its own.
"""

from __future__ import annotations

import time

import redis

_clients: dict[str, redis.Redis] = {}


def record_start(to: str, key: str, sent: float) -> None:
    started = time.time()  # first: what is measured is the wait before the body runs
    client = _clients.get(to)
    if client is None:
        client = _clients[to] = redis.Redis.from_url(to)
    client.rpush(key, f"{sent} {started}")
