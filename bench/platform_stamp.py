"""``bench.stamp``: the platform job type of the pickup-latency probe (see :mod:`stamp`).

Platform workers of the bench load it with ``--include platform_stamp``.
"""

from __future__ import annotations

from stamp import record_start

from tasks_platform.jobs.declaration import job


@job("bench.stamp", queue="default")
def stamp(to: str, key: str, sent: float) -> None:
    """Notes when it started (see :mod:`stamp`)."""
    record_start(to, key, sent)
