"""Tenant limits and fairness: one tenant floods a queue, another keeps flowing.

Two real ``celery worker`` processes (prefork, 2 pool processes each) on Redis, with tenant
``A`` limited to ``--rate`` jobs a second (``TASKS_TENANT_LIMITS``) and tenant ``B`` unlimited,
both submitting no-op ``demo.work`` jobs to the same queue:

1. B alone: ``--b-jobs`` jobs spaced ``1 / --b-rate`` s apart; each one's wait is the time from
   its submission to its start (the job writes its start time to a file);
2. A floods: ``--flood`` jobs submitted at once;
3. B again, the same way, while A's flood drains;
4. A's rate: its jobs' starts counted over ``--window`` seconds, from its first second on.

``--worker-only`` floods without intake pacing (the jobs enter the queue at once and only the
workers' admission holds them back), to show what pacing buys.

Acceptance: A's rate within 10% of the limit, and B's p95 wait under the flood at most twice
its unloaded p95 (measured in the same run). Prints a markdown table; ``--json PATH`` writes
the figures. Needs Redis (``BENCH_FAIRNESS_REDIS_URL``, a database of its own); the history
is off (this measures the limits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from tasks_platform.application import PlatformCelery, create_app
from tasks_platform.history import recorder
from tasks_platform.limits.store import PACED_HEADER
from tasks_platform.process import WorkerProcess
from tasks_platform.settings import Settings

REDIS_URL = os.environ.get("BENCH_FAIRNESS_REDIS_URL", "redis://127.0.0.1:6379/10")
TARGET_RATE_ERROR = 0.10  # A's measured rate within 10% of its limit
TARGET_P95_RATIO = 2.0  # B's p95 wait under the flood at most twice the unloaded one


def b_waits(app: PlatformCelery, record: Path, jobs: int, rate: float) -> list[float]:
    """Submit ``jobs`` jobs of tenant B at ``rate``/s; the seconds each waited to start."""
    work = app.tasks["demo.work"]
    submitted: dict[str, float] = {}
    for number in range(jobs):
        label = f"b{number}"
        submitted[label] = time.time()
        work.apply_async(kwargs={"label": label, "record_to": str(record)}, tenant="B")
        time.sleep(max(submitted[label] + 1 / rate - time.time(), 0))
    deadline = time.monotonic() + 120
    while len(starts(record)) < jobs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(starts(record))} of {jobs} B jobs started in 2 min")
        time.sleep(0.05)
    return [at - submitted[label] for label, at in starts(record).items()]


def starts(record: Path) -> dict[str, float]:
    if not record.exists():
        return {}
    lines = [line.split() for line in record.read_text().splitlines() if line.strip()]
    return {line[0]: float(line[4]) for line in lines if line[3] == "start"}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def measure(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    limits = {"A": {"demo.work": {"rate": args.rate}}}
    settings = Settings(broker_url=REDIS_URL, data_dir=data, history_enabled=False,
                        queue_prefix=f"bench-{uuid.uuid4().hex[:6]}-",
                        tenant_limits=limits)  # fmt: skip
    app = create_app(settings, set_as_current=False)
    with app.connection_for_write() as connection:
        app.topology.declare_all(connection.default_channel)
    workers = [
        WorkerProcess(settings, concurrency=args.concurrency, loglevel="WARNING",
                      log_file=data / f"worker-{n}.log")
        for n in range(args.workers)
    ]  # fmt: skip
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(app)
        unloaded = b_waits(app, data / "b-unloaded.txt", args.b_jobs, args.b_rate)
        flood_record = data / "a.txt"
        work = app.tasks["demo.work"]
        # --worker-only: marked as paced, the flood skips intake pacing and enters the queue at
        # once; only the workers' admission holds it back (what pacing is compared against)
        headers = {PACED_HEADER: "1"} if args.worker_only else {}
        began = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for number in range(args.flood):
                work.apply_async(kwargs={"label": f"a{number}", "record_to": str(flood_record)},
                                 tenant="A", producer=producer, headers=headers)  # fmt: skip
        submit_seconds = time.perf_counter() - began
        loaded = b_waits(app, data / "b-loaded.txt", args.b_jobs, args.b_rate)
        first = min(starts(flood_record).values())
        end = first + 1.0 + args.window
        while max(starts(flood_record).values()) < end:
            time.sleep(0.1)
        a_starts = sorted(starts(flood_record).values())
        counted = sum(first + 1.0 <= at < end for at in a_starts)
        rate = counted / args.window
    finally:
        for worker in workers:
            worker.stop()
        recorder.close_all()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{settings.queue_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        with app.connection_for_write() as connection:
            app.topology.delete_all(connection.default_channel)
        app.close()
    return {
        "rate_limit": args.rate, "a_jobs": args.flood, "a_submit_seconds": submit_seconds,
        "a_rate": rate, "a_rate_ratio": rate / args.rate, "a_window_seconds": args.window,
        "b_jobs": args.b_jobs, "b_rate": args.b_rate,
        "b_p95_unloaded": p95(unloaded), "b_p95_flood": p95(loaded),
        "b_p95_ratio": p95(loaded) / p95(unloaded),
        "b_median_unloaded": statistics.median(unloaded),
        "b_median_flood": statistics.median(loaded),
        "b_max_unloaded": max(unloaded), "b_max_flood": max(loaded),
        "workers": args.workers, "pool": f"prefork -c {args.concurrency}", "broker": "redis",
        "intake_pacing": not args.worker_only,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20, help="tenant A's limit, jobs/s")
    parser.add_argument("--flood", type=int, default=5000, help="tenant A's jobs, at once")
    parser.add_argument("--b-jobs", type=int, default=200, help="tenant B's jobs per phase")
    parser.add_argument("--b-rate", type=float, default=40.0, help="tenant B's jobs/s")
    parser.add_argument("--window", type=float, default=10.0, help="seconds A's rate is counted")
    parser.add_argument("--workers", type=int, default=2, help="celery worker processes")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes each")
    parser.add_argument("--worker-only", action="store_true",
                        help="flood without intake pacing (the workers' check only)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as data:
        result = measure(args, Path(data))
    ratio_ok = abs(result["a_rate_ratio"] - 1) <= TARGET_RATE_ERROR
    p95_ok = result["b_p95_ratio"] <= TARGET_P95_RATIO
    pacing = "without intake pacing" if args.worker_only else "paced at intake"
    print(f"\n### Fairness (Redis, {args.workers} workers x prefork -c {args.concurrency}, "
          f"{args.flood:,} jobs of tenant A at once, {pacing}, "
          f"{args.b_jobs} jobs of B per phase)\n")  # fmt: skip
    print("| measure | figure | baseline (same run) | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| A's rate over {args.window:.0f} s | {result['a_rate']:.2f} jobs/s | limit: "
          f"{args.rate} jobs/s | {result['a_rate_ratio']:.3f} | 0.9 - 1.1 |")  # fmt: skip
    print(f"| B's p95 wait under the flood | {result['b_p95_flood'] * 1000:.1f} ms | "
          f"unloaded: {result['b_p95_unloaded'] * 1000:.1f} ms | "
          f"{result['b_p95_ratio']:.2f}x | <= {TARGET_P95_RATIO:.0f}x |")  # fmt: skip
    print(f"| B's median wait under the flood | {result['b_median_flood'] * 1000:.1f} ms | "
          f"unloaded: {result['b_median_unloaded'] * 1000:.1f} ms | "
          f"{result['b_median_flood'] / result['b_median_unloaded']:.2f}x | |")  # fmt: skip
    print(f"| submitting A's {args.flood:,} jobs | {result['a_submit_seconds']:.2f} s | | | |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    met = ratio_ok and p95_ok
    print(f"\ntargets {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
