"""What the benchmarks share: service URLs, a fresh PostgreSQL schema, drain timing, worker RSS.

The benchmarks run as scripts (``python bench/compare.py``), so this directory is on
``sys.path`` and they import this module as ``common``; workers they start get it on their
``PYTHONPATH`` (:func:`worker_env`).
"""

from __future__ import annotations

import math
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

BENCH_DIR = Path(__file__).resolve().parent
POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: seconds between two looks at the broker while a drain is timed: often enough for figures of
#: a few seconds, rarely enough that the looks take no CPU the workers would miss (at 2 ms they
#: took a tenth of a core on the 2-core machine and made the drains vary twice as much)
POLL_INTERVAL = 0.01


def empty_history(database_url: str) -> None:
    """Empty the history tables (TRUNCATE: a DELETE would leave the rows dead in the table,
    for the next run's writer to read past)."""
    engine = sa.create_engine(database_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("TRUNCATE jobs, job_events"))
    finally:
        engine.dispose()


@contextmanager
def postgres_schema(base_url: str = POSTGRES_URL) -> Iterator[str]:
    """A database URL whose tables live in a fresh schema, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base_url, poolclass=NullPool)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{base_url}?options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


def time_drain(
    outstanding: Callable[[], int], jobs: int, *, alive: Callable[[], bool], timeout: float = 600
) -> float:
    """Seconds from the moment ``outstanding()`` first drops below ``jobs`` until it is 0.

    ``outstanding`` counts what the broker still holds (waiting, plus delivered but not yet
    acknowledged where the broker can tell): the workers booting are not timed.
    """
    deadline = time.monotonic() + timeout
    while outstanding() >= jobs:
        if time.monotonic() > deadline or not alive():
            raise RuntimeError("the workers never started consuming")
        time.sleep(POLL_INTERVAL)
    started = time.perf_counter()
    while outstanding():
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not drain the queue in time")
        time.sleep(POLL_INTERVAL)
    return time.perf_counter() - started


def peak_rss_bytes(pids: Sequence[int]) -> int:
    """Sum of the peak resident set (VmHWM) of ``pids`` and all their descendants."""
    import psutil  # noqa: PLC0415 - a bench dependency (the `bench` extra)

    seen: set[int] = set()
    total = 0
    for pid in pids:
        try:
            family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in family:
            if process.pid in seen:
                continue
            seen.add(process.pid)
            total += _vmhwm(process.pid)
    return total


def _vmhwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker the bench starts: no TASKS_*, this directory importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]
