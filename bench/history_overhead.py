"""What recording the history costs, measured against the same setup with it off.

1. Worker throughput: a real ``celery worker`` (prefork, 2 processes, the platform's default
   settings) drains N no-op jobs queued on Redis beforehand, once with the history recorded
   into PostgreSQL and once without; repeated, alternating (the order swapped every repetition),
   and the medians compared, with the spread of the back-to-back pairs. The
   drain is timed by the broker itself: from the moment the queue starts to shrink until it
   and kombu's unacked hash are both empty (every job acknowledged, so done: acks are late).
2. Recorder write rate: one process records queued/started/succeeded for M jobs and the
   recorder writes them into PostgreSQL; the baseline is a bare ``executemany`` INSERT of the
   same number of ``job_events`` rows in the same run.

Prints a markdown table and writes the figures as JSON (``--json PATH``).
Needs Redis and PostgreSQL (``BENCH_REDIS_URL``, ``BENCH_POSTGRES_URL``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from common import empty_history, postgres_schema, time_drain
from sqlalchemy.pool import NullPool

from tasks_platform.application import create_app
from tasks_platform.history import recorder
from tasks_platform.history.migrations import upgrade
from tasks_platform.history.models import TERMINAL_STATES, Job, JobState
from tasks_platform.history.recorder import Recorder
from tasks_platform.history.writer import Transition
from tasks_platform.process import WorkerProcess
from tasks_platform.settings import Settings
from tasks_platform.stats.broker import redis_list_name
from tasks_platform.topology import REDIS_PRIORITY_STEPS

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
TARGET_COST = 0.10  # recording may cost at most 10% of the throughput
TARGET_EVENTS = 5_000  # events per second into PostgreSQL, at least


def drain(settings: Settings, jobs: int) -> dict[str, float]:
    """Queue ``jobs`` no-op jobs, start a worker, time how fast it empties the queue."""
    app = create_app(settings, set_as_current=False)
    client = redis.Redis.from_url(REDIS_URL)
    queue = app.topology.queue_name("default")
    lists = [redis_list_name(queue, step) for step in REDIS_PRIORITY_STEPS]
    unacked = "unacked"  # kombu's default key; the bench's Redis database is its own
    if settings.history_enabled:  # each drain counts its own rows
        empty_history(str(settings.database_url))
    try:
        noop = app.tasks["demo.noop"]
        with app.producer_or_acquire() as producer:
            for _ in range(jobs):
                noop.apply_async(producer=producer)
        recorder.close_all()  # the producer's `queued` transitions are written before timing

        def waiting() -> int:
            with client.pipeline() as pipe:
                for key in lists:
                    pipe.llen(key)
                pipe.hlen(unacked)
                return int(sum(pipe.execute()))

        assert waiting() == jobs, f"expected {jobs} queued jobs, found {waiting()}"
        worker = WorkerProcess(settings, concurrency=2, loglevel="WARNING").start()
        try:
            process = worker.process
            assert process is not None
            seconds = time_drain(waiting, jobs, alive=lambda: process.poll() is None)
            figures = {"seconds": seconds, "jobs_per_second": jobs / seconds}
            if settings.history_enabled:
                figures["history_lag_seconds"] = _history_lag(settings, jobs)
            return figures
        finally:
            worker.stop()
    finally:
        client.delete(*lists, unacked)
        client.close()
        app.close()


def _history_lag(settings: Settings, jobs: int) -> float:
    """Seconds after the drain until every job's row is terminal in the history."""
    engine = sa.create_engine(str(settings.database_url), poolclass=NullPool)
    started = time.perf_counter()
    terminal = [state.value for state in TERMINAL_STATES]
    query = sa.select(sa.func.count()).select_from(Job).where(Job.state.in_(terminal))
    try:
        while True:
            with engine.connect() as connection:
                if connection.scalar(query) == jobs:
                    return time.perf_counter() - started
            if time.perf_counter() - started > 120:
                raise RuntimeError("the history did not catch up within 2 minutes")
            time.sleep(0.05)
    finally:
        engine.dispose()


def recorder_rate(settings: Settings, jobs: int) -> float:
    """Events per second the recorder writes into PostgreSQL (3 transitions per job)."""
    sink = Recorder(settings)
    now = time.time()
    facts = {"name": "demo.noop", "queue": "default", "priority": "normal", "kwargs": {}}
    started = time.perf_counter()
    for number in range(jobs):
        job_id = f"rec-{number:07d}"
        sink.record(Transition(job_id, JobState.QUEUED, 1, now, facts=facts))
        sink.record(Transition(job_id, JobState.STARTED, 1, now + 0.001, worker="w1"))
        sink.record(Transition(job_id, JobState.SUCCEEDED, 1, now + 0.002, worker="w1"))
    sink.close(timeout=600)
    seconds = time.perf_counter() - started
    assert sink.written == 3 * jobs, f"wrote {sink.written} of {3 * jobs} events"
    return 3 * jobs / seconds


def insert_rate(database_url: str, events: int) -> float:
    """Events per second of a bare multi-row INSERT into job_events (the baseline)."""
    engine = sa.create_engine(database_url, poolclass=NullPool)
    at = datetime.now(UTC)
    jobs = [{"id": f"ins-{n:07d}", "state": "succeeded", "progress": 15, "attempts": 1,
             "updated_at": at} for n in range(events // 3)]  # fmt: skip
    rows = [{"id": uuid.uuid4().hex, "job_id": f"ins-{n // 3:07d}", "state": "succeeded",
             "attempt": 1, "at": at} for n in range(len(jobs) * 3)]  # fmt: skip
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(
                "INSERT INTO jobs (id, state, progress, attempts, updated_at) "
                "VALUES (:id, :state, :progress, :attempts, :updated_at)"
            ), jobs)  # fmt: skip
        started = time.perf_counter()
        for start in range(0, len(rows), 500):
            with engine.begin() as connection:
                connection.execute(sa.text(
                    "INSERT INTO job_events (id, job_id, state, attempt, at) "
                    "VALUES (:id, :job_id, :state, :attempt, :at)"
                ), rows[start : start + 500])  # fmt: skip
        return len(rows) / (time.perf_counter() - started)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="no-op jobs per drain")
    parser.add_argument("--repeat", type=int, default=5, help="drains per mode (median)")
    parser.add_argument("--events-jobs", type=int, default=20_000, help="jobs for the recorder")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)

    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as data, postgres_schema() as database_url:
        base = Settings(broker_url=REDIS_URL, database_url=database_url, data_dir=Path(data))
        upgrade(base)
        for repetition in range(args.repeat):
            # alternate, and swap the order every repetition, so drift hits both alike
            for mode in ("off", "on") if repetition % 2 == 0 else ("on", "off"):
                settings = base.model_copy(update={
                    "history_enabled": mode == "on",
                    "queue_prefix": f"bench-{uuid.uuid4().hex[:6]}-",
                })  # fmt: skip
                figures = drain(settings, args.jobs)
                runs[mode].append(figures)
                print(f"  drain {repetition + 1}/{args.repeat} history {mode}: "
                      f"{figures['jobs_per_second']:.0f} jobs/s", file=sys.stderr)  # fmt: skip
        empty_history(database_url)
        rate = recorder_rate(base, args.events_jobs)
        baseline_rate = insert_rate(database_url, 3 * args.events_jobs)

    off = statistics.median(r["jobs_per_second"] for r in runs["off"])
    on = statistics.median(r["jobs_per_second"] for r in runs["on"])
    lag = statistics.median(r["history_lag_seconds"] for r in runs["on"])
    cost = 1 - on / off
    # each repetition's pair, measured back to back: how far this machine's noise reaches
    pairs = sorted(b["jobs_per_second"] / a["jobs_per_second"]
                   for a, b in zip(runs["off"], runs["on"], strict=True))  # fmt: skip
    result: dict[str, Any] = {
        "jobs": args.jobs, "repeat": args.repeat, "broker": "redis", "worker": "prefork -c 2",
        "drain_history_off_jobs_per_second": off, "drain_history_on_jobs_per_second": on,
        "ratio_on_vs_off": on / off, "cost": cost, "history_lag_seconds_median": lag,
        "pair_ratios": pairs,
        "recorder_events_per_second": rate, "bare_insert_events_per_second": baseline_rate,
        "ratio_recorder_vs_bare_insert": rate / baseline_rate, "runs": runs,
        "targets": {"max_cost": TARGET_COST, "min_recorder_events_per_second": TARGET_EVENTS},
    }  # fmt: skip
    print(f"\n### History recording cost (Redis, {args.jobs} no-op jobs, prefork -c 2, "
          f"median of {args.repeat})\n")  # fmt: skip
    print("| measure | figure | baseline (same run) | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| worker drain, history on | {on:,.0f} jobs/s | history off: {off:,.0f} jobs/s "
          f"| {on / off:.2f}x (cost {cost:.1%}) | cost <= {TARGET_COST:.0%} |")  # fmt: skip
    print(f"| each repetition's pair, on / off | {pairs[0]:.2f}x to {pairs[-1]:.2f}x, median "
          f"{statistics.median(pairs):.2f}x | | | |")  # fmt: skip
    print(f"| history caught up after the drain | {lag:.2f} s | | | |")
    print(f"| recorder into PostgreSQL | {rate:,.0f} events/s | bare INSERT: "
          f"{baseline_rate:,.0f} events/s | {rate / baseline_rate:.2f}x "
          f"| >= {TARGET_EVENTS:,} events/s |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    met = cost <= TARGET_COST and rate >= TARGET_EVENTS
    print(f"\ntargets {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
