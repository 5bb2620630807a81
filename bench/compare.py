"""Side by side: the platform against bare Celery, Dramatiq and RQ, measured in one run.

Same machine, same brokers (Redis and RabbitMQ), each figure the median of ``--repeat`` runs,
every row shown as a ratio to its baseline measured in the same run:

1. enqueue: ``delay()`` of a no-op job, ``--jobs`` of them, jobs/s: the platform (history on)
   against bare Celery (a plain Celery app, default settings, JSON); the bulk submit API
   (``submit_many``) against the platform's own ``delay()``;
2. drain: the ``--jobs`` no-op jobs queued beforehand, then 2 worker processes started; timed
   by the broker, from the moment the queue starts to shrink until it is empty and (Redis:
   kombu's unacked hash, Dramatiq's message hash, RQ's started registry) nothing is left
   unacknowledged. The platform (prefork -c 2, history on into PostgreSQL) and bare Celery
   (prefork -c 2) on both brokers, Dramatiq (2 processes x 8 threads) on both, RQ (2 workers,
   a fork per job: its default) on Redis; and the platform's throughput profile
   (:data:`PROFILE`, or ``--profile-*``) against Dramatiq on Redis. On RabbitMQ the broker
   only tells the ready messages: the last few prefetched ones are not waited for (at most
   prefetch x processes, a few milliseconds of work);
3. pickup latency: ``--rate`` jobs/s for ``--latency-seconds``; each job notes when its body
   started (in Redis), against the submit time in its payload; p50 and p99;
4. worker peak RSS: VmHWM summed over a worker's processes (main and pool), after a drain.

The systems (how each is filled, run and counted) are in :mod:`systems`. Prints a markdown table,
writes everything as JSON (``--json PATH``). ``--quick`` is a smaller
run (2,000 jobs, 3 s of latency probes) for a check; ``--only`` picks sections.
Needs Redis, RabbitMQ and PostgreSQL (``BENCH_COMPARE_REDIS_URL``, a database of its own;
``BENCH_RABBITMQ_URL``; ``BENCH_POSTGRES_URL``) and the ``bench`` extra (dramatiq, rq, psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import platform_stamp  # noqa: F401 - registers bench.stamp
import redis
from common import (
    POSTGRES_URL,
    empty_history,
    median,
    peak_rss_bytes,
    percentile,
    postgres_schema,
    time_drain,
)
from systems import REDIS_URL, BareCelery, Dramatiq, Platform, Rq, System

import tasks_platform  # noqa: F401 - registers the job families
from tasks_platform.history.migrations import upgrade
from tasks_platform.settings import Settings

#: the throughput profile for short jobs (see the README's Performance section): worker
#: processes, pool, concurrency, settings (TASKS_* names), extra worker arguments
PROFILE: dict[str, Any] = {
    "workers": 2,
    "pool": "solo",
    "concurrency": 1,
    "settings": {
        "TASKS_PREFETCH_MULTIPLIER": "32",
        "TASKS_TASK_EVENTS": "false",
    },
    "args": [],
}
TARGETS = {
    "enqueue_vs_bare": 0.9,
    "bulk_vs_delay": 10.0,
    "drain_vs_bare": 1.0,
    "profile_vs_dramatiq": 1.0,
    "pickup_p99_redis_ms": 10.0,
}


# -- the measurements ----------------------------------------------------------------------------
def drain(system: System, jobs: int) -> dict[str, float]:
    """Enqueue ``jobs`` no-ops (timed), then start the workers and time the drain."""
    jobs = min(jobs, system.max_jobs or jobs)
    started = time.perf_counter()
    system.enqueue(jobs)
    enqueue_seconds = time.perf_counter() - started
    if isinstance(system, Platform):
        system.flush_history()
    # publishes without confirms (bare Celery on RabbitMQ) may still be on their way
    deadline = time.monotonic() + 30
    while (waiting := system.outstanding()) != jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    if waiting != jobs:
        raise RuntimeError(f"{system.label}: expected {jobs} queued jobs, found {waiting}")
    system.start_workers()
    seconds = time_drain(system.outstanding, jobs, alive=system.workers.alive)
    rss = peak_rss_bytes(system.workers.pids())
    figures = {"enqueue_per_second": jobs / enqueue_seconds, "drain_per_second": jobs / seconds,
               "drain_seconds": seconds, "peak_rss_bytes": rss}  # fmt: skip
    if isinstance(system, Platform):  # every job ran, and when its history said so
        figures["history_lag_seconds"] = system.wait_history(jobs)
    return figures


def bulk_rate(system: Platform, jobs: int) -> float:
    started = time.perf_counter()
    system.enqueue_bulk(jobs)
    rate = jobs / (time.perf_counter() - started)
    system.flush_history()
    waiting = system.outstanding()
    if waiting != jobs:
        raise RuntimeError(f"bulk: expected {jobs} queued jobs, found {waiting}")
    system.purge()
    return rate


def pickup(system: Platform | BareCelery, rate: float, seconds: float) -> dict[str, float]:
    """Submit ``rate`` stamp jobs a second for ``seconds``; p50/p99 of submit -> body start."""
    key = f"cmp-stamps-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    name = "bench.stamp" if isinstance(system, Platform) else "bare.stamp"
    task = system.app.tasks[name]
    system.start_workers()
    try:
        _wait_ready(system, task, client, key)
        jobs = int(rate * seconds)
        began = time.monotonic()
        for number in range(jobs):
            time.sleep(max(began + number / rate - time.monotonic(), 0))
            task.delay(to=REDIS_URL, key=key, sent=time.time())
        deadline = time.monotonic() + 120
        while client.llen(key) < jobs + 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system.label}: only {client.llen(key)} of {jobs} stamps")
            time.sleep(0.05)
        pairs = [line.split() for line in client.lrange(key, 1, -1)]
        waits = [(float(started) - float(sent)) * 1000 for sent, started in pairs]
        return {"p50_ms": percentile(waits, 0.5), "p99_ms": percentile(waits, 0.99),
                "max_ms": max(waits), "jobs": jobs}  # fmt: skip
    finally:
        client.delete(key)
        client.close()
        system.workers.stop()
        for worker in getattr(system, "pool_workers", []):
            worker.stop()
        if isinstance(system, Platform):
            system.pool_workers.clear()
        system.workers.processes.clear()


def _wait_ready(system: System, task: Any, client: redis.Redis, key: str) -> None:
    """One stamp job through, so the workers are consuming before the clock starts."""
    task.delay(to=REDIS_URL, key=key, sent=time.time())
    deadline = time.monotonic() + 120
    while client.llen(key) < 1:
        if time.monotonic() > deadline or not system.workers.alive():
            raise RuntimeError(f"{system.label}: the workers never ran a job")
        time.sleep(0.05)
    time.sleep(1.0)  # the pool settles


# -- the run -------------------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Every section, every repetition; the raw figures by name."""
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, postgres_schema(POSTGRES_URL) as database_url:
        upgrade(Settings(database_url=database_url, data_dir=Path(tmp)))
        for repetition in range(args.repeat):
            print(f"repetition {repetition + 1}/{args.repeat}", file=sys.stderr, flush=True)
            for broker in args.brokers:
                for make in _drain_systems(broker, args, database_url):
                    with _system(make, Path(tmp), database_url) as system:
                        if "bulk" in args.only and type(system) is Platform and not system.profile:
                            _note(runs, f"bulk/{broker}",
                                  {"per_second": bulk_rate(system, args.jobs)})  # fmt: skip
                        if "drain" in args.only:
                            _note(runs, f"drain/{broker}/{system.label}", drain(system, args.jobs))
                if "pickup" in args.only:
                    for make in _pickup_systems(broker, database_url):
                        with _system(make, Path(tmp), database_url) as system:
                            figures = pickup(system, args.rate, args.latency_seconds)  # type: ignore[arg-type]
                            _note(runs, f"pickup/{broker}/{system.label}", figures)
    return runs


def _note(runs: dict[str, list[dict[str, float]]], name: str, figures: dict[str, float]) -> None:
    runs.setdefault(name, []).append(figures)
    shown = ", ".join(f"{k} {v:,.1f}" for k, v in figures.items() if "rss" not in k)
    print(f"  {name}: {shown}", file=sys.stderr, flush=True)


@contextmanager
def _system(make: Callable[[Path], System], tmp: Path, database_url: str) -> Iterator[System]:
    """A system in a folder of its own; closed (and the history emptied) afterwards."""
    system = make(Path(tempfile.mkdtemp(dir=tmp)))
    try:
        yield system
    finally:
        system.close()
        if isinstance(system, Platform):
            empty_history(database_url)


def _pickup_systems(broker: str, database_url: str) -> list[Callable[[Path], System]]:
    return [lambda data: Platform(broker, data, database_url),
            lambda data: BareCelery(broker, data)]  # fmt: skip


def _drain_systems(
    broker: str, args: argparse.Namespace, database_url: str
) -> list[Callable[[Path], System]]:
    makers: list[Callable[[Path], System]] = [
        lambda data: BareCelery(broker, data),
        lambda data: Platform(broker, data, database_url),
    ]
    if "drain" not in args.only:
        return makers
    if "dramatiq" in args.peers:
        makers.append(lambda data: Dramatiq(broker, data))
    if broker == "redis":
        makers.append(lambda data: Platform(broker, data, database_url, args.profile))
        if "rq" in args.peers:
            makers.append(lambda data: Rq(broker, data))
    return makers


class Rows:
    """The table: one row per figure, with its same-run baseline and ratio.

    Figures are medians over the repetitions; a ratio is the median of the per-repetition
    ratios (each pair measured minutes apart), which drifting load on the machine skews less.
    """

    def __init__(self, runs: dict[str, list[dict[str, float]]]) -> None:
        self.runs = runs
        self.rows: list[dict[str, Any]] = []

    def fig(self, name: str, key: str) -> float:
        return median([r[key] for r in self.runs.get(name, [])])

    def add(self, measure: str, broker: str, system: str, figure: tuple[str, str],
            baseline: tuple[str, str, str], unit: str, target: float | None = None, *,
            higher: bool = True, scale: float = 1.0) -> None:  # fmt: skip
        """``figure`` is (run name, key); ``baseline`` (label, run name, key)."""
        label, base_name, base_key = baseline
        value = self.fig(*figure) * scale
        base = self.fig(base_name, base_key) * scale
        pairs = zip(self.runs.get(figure[0], []), self.runs.get(base_name, []), strict=False)
        ratio = median([a[figure[1]] / b[base_key] for a, b in pairs if b[base_key]])
        met = None
        if target is not None:
            met = ratio >= target if higher else value <= target
        shown = "" if target is None else (f">= {target:g}x" if higher else f"<= {target:g} ms")
        self.rows.append({"measure": measure, "broker": broker, "system": system, "value": value,
                          "baseline": label, "baseline_value": base, "unit": unit,
                          "ratio": ratio, "target": shown, "met": met})  # fmt: skip


def summarize(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> dict[str, Any]:
    table = Rows(runs)
    for broker in args.brokers:
        if f"drain/{broker}/bare Celery" in runs and f"drain/{broker}/platform" in runs:
            _enqueue_rows(table, broker)
            _drain_rows(table, broker)
        _pickup_rows(table, broker, args.rate)
    return {"rows": table.rows, "runs": runs}


def _enqueue_rows(table: Rows, broker: str) -> None:
    plat = (f"drain/{broker}/platform", "enqueue_per_second")
    table.add("enqueue, delay()", broker, "platform", plat,
              ("bare Celery", f"drain/{broker}/bare Celery", "enqueue_per_second"), "jobs/s",
              TARGETS["enqueue_vs_bare"])  # fmt: skip
    if f"bulk/{broker}" in table.runs:
        table.add("enqueue, submit_many()", broker, "platform", (f"bulk/{broker}", "per_second"),
                  ("platform delay()", *plat), "jobs/s", TARGETS["bulk_vs_delay"])  # fmt: skip


def _drain_rows(table: Rows, broker: str) -> None:
    bare = ("bare Celery", f"drain/{broker}/bare Celery", "drain_per_second")
    for label in ("platform", "Dramatiq", "RQ"):
        if f"drain/{broker}/{label}" in table.runs:
            target = TARGETS["drain_vs_bare"] if label == "platform" else None
            figure = (f"drain/{broker}/{label}", "drain_per_second")
            table.add("drain, 2 processes", broker, label, figure, bare, "jobs/s", target)
    profile, dramatiq = f"drain/{broker}/platform, throughput profile", f"drain/{broker}/Dramatiq"
    if profile in table.runs and dramatiq in table.runs:
        table.add("drain, throughput profile", broker, "platform, profile",
                  (profile, "drain_per_second"), ("Dramatiq", dramatiq, "drain_per_second"),
                  "jobs/s", TARGETS["profile_vs_dramatiq"])  # fmt: skip
    for name in (f"drain/{broker}/platform", profile):
        if name in table.runs:
            table.add("history caught up after the drain", broker, name.split("/", 2)[2],
                      (name, "history_lag_seconds"), ("its drain", name, "drain_seconds"),
                      "s")  # fmt: skip
    for name in sorted(n for n in table.runs if n.startswith(f"drain/{broker}/")):
        table.add("worker peak RSS", broker, name.split("/", 2)[2], (name, "peak_rss_bytes"),
                  ("bare Celery", bare[1], "peak_rss_bytes"), "MiB", scale=2**-20)  # fmt: skip


def _pickup_rows(table: Rows, broker: str, rate: float) -> None:
    plat, bare = f"pickup/{broker}/platform", f"pickup/{broker}/bare Celery"
    if plat not in table.runs or bare not in table.runs:
        return
    for key in ("p50_ms", "p99_ms"):
        target = TARGETS["pickup_p99_redis_ms"] if key == "p99_ms" and broker == "redis" else None
        table.add(f"pickup {key[:3]} at {rate:.0f}/s", broker, "platform", (plat, key),
                  ("bare Celery", bare, key), "ms", target, higher=False)  # fmt: skip


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n### Side by side ({args.jobs:,} no-op jobs, medians of {args.repeat}, "
          f"one run on this machine)\n")  # fmt: skip
    print("| measure | broker | system | figure | baseline (same run) | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        fmt = "{:,.0f}" if r["unit"] == "jobs/s" else "{:,.1f}"
        verdict = "" if r["met"] is None else (" met" if r["met"] else " MISSED")
        print(f"| {r['measure']} | {r['broker']} | {r['system']} | "
              f"{fmt.format(r['value'])} {r['unit']} | {r['baseline']}: "
              f"{fmt.format(r['baseline_value'])} {r['unit']} | {r['ratio']:.2f}x | "
              f"{r['target']}{verdict} |")  # fmt: skip
    missed = [r for r in result["rows"] if r["met"] is False]
    print(f"\ntargets {'met' if not missed else 'MISSED: ' + str(len(missed))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="no-op jobs per drain")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--rate", type=float, default=100.0, help="pickup probes per second")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="pickup probe time")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, 3 s of probes")
    parser.add_argument("--brokers", default="redis,rabbitmq", help="comma-separated")
    parser.add_argument("--only", default="drain,bulk,pickup", help="sections, comma-separated")
    parser.add_argument("--peers", default="dramatiq,rq", help="peers to run, comma-separated")
    parser.add_argument("--profile-pool", default=PROFILE["pool"])
    parser.add_argument("--profile-workers", type=int, default=PROFILE["workers"])
    parser.add_argument("--profile-concurrency", type=int, default=PROFILE["concurrency"])
    parser.add_argument("--profile-setting", action="append", default=[], metavar="TASKS_X=V",
                        help="a setting of the throughput profile (repeatable)")  # fmt: skip
    parser.add_argument("--profile-arg", action="append", default=[], metavar="ARG",
                        help="an extra worker argument of the profile (repeatable)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.latency_seconds = min(args.jobs, 2000), min(args.latency_seconds, 3.0)
    args.brokers = [b for b in args.brokers.split(",") if b]
    args.only = set(args.only.split(","))
    args.peers = set(args.peers.split(","))
    settings = dict(PROFILE["settings"])
    settings.update(dict(s.split("=", 1) for s in args.profile_setting))
    args.profile = {"workers": args.profile_workers, "pool": args.profile_pool,
                    "concurrency": args.profile_concurrency, "settings": settings,
                    "args": [*PROFILE["args"], *args.profile_arg]}  # fmt: skip

    runs = measure(args)
    result = summarize(runs, args)
    result.update({"jobs": args.jobs, "repeat": args.repeat, "rate": args.rate,
                   "latency_seconds": args.latency_seconds, "profile": args.profile,
                   "targets": TARGETS, "cpus": os.cpu_count(),
                   "load_average": os.getloadavg()})  # fmt: skip
    print_table(result, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    missed = any(r["met"] is False for r in result["rows"])
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
