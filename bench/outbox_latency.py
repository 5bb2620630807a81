"""What the outbox costs against plain ``delay()``, and what publisher confirms cost.

1. Pickup latency: a relay (``tasks_platform.outbox.relay.Relay``, woken by LISTEN/NOTIFY)
   runs in a process of its own while this one submits one job per transaction through the
   outbox at a steady rate ("normal load"); the latency of a job is from its ``COMMIT``
   returning to the broker confirming its publish (both processes read CLOCK_MONOTONIC).
   Baseline, same run: the time of a plain ``delay()`` call (the publish, with confirms on
   RabbitMQ). Target: pickup p99 <= 50 ms.
2. Submit cost: jobs/s of ``apply_in`` (one job per transaction, committed) against
   ``delay()`` on the same broker, and of ``apply_in`` with many jobs in one transaction.
3. Direct path on RabbitMQ: the ``delay()`` rate with publisher confirms (the platform's
   default) against the same app with confirms off.

Both brokers for 1 and 2. Each run uses a fresh PostgreSQL schema and its own queue prefix
(deleted afterwards); no worker runs, the published jobs are deleted with their queues.
Prints a markdown table and writes the figures as JSON (``--json PATH``).
Needs Redis, RabbitMQ and PostgreSQL (``BENCH_REDIS_URL``, ``BENCH_RABBITMQ_URL``,
``BENCH_POSTGRES_URL``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import RABBITMQ_URL, median, percentile, postgres_schema

from tasks_platform.application import create_app
from tasks_platform.history import recorder
from tasks_platform.history.migrations import upgrade
from tasks_platform.outbox.relay import Relay
from tasks_platform.outbox.submit import sessions_for
from tasks_platform.process import settings_env
from tasks_platform.settings import Settings, load_settings

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
BROKERS = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}
TARGET_P99 = 0.050  # seconds from commit to confirmed publish


class TimedRelay(Relay):
    """A relay that notes when the broker confirmed each job's publish (CLOCK_MONOTONIC, the
    same clock in every process of this machine)."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.confirmed: dict[str, float] = {}

    def _publish(self, producer: Any, row: Any) -> None:
        super()._publish(producer, row)
        self.confirmed[row.id] = time.monotonic()


def serve_relay(out: Path) -> None:
    """Child process: relay (settings from TASKS_*) until SIGTERM, then write the times."""
    app = create_app(load_settings(), set_as_current=False)
    relay = TimedRelay(app)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    relay.run(stop)
    out.write_text(json.dumps(relay.confirmed))


@contextmanager
def relay_process(app: Any, out: Path) -> Iterator[None]:
    """A relay in a process of its own (as in production: a worker's, or `tasks-platform
    relay`), listening before this returns."""
    env = {**os.environ, **settings_env(app.settings)}
    child = subprocess.Popen([sys.executable, __file__, "--serve-relay", str(out)], env=env)
    try:
        time.sleep(3.0)  # imported, connected, LISTENing
        yield
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)


@contextmanager
def platform(broker: str, data_dir: Path, **overrides: Any) -> Iterator[Any]:
    """An app on ``broker`` with a fresh history schema and its own declared queues."""
    with postgres_schema() as url:
        settings = Settings(broker_url=BROKERS[broker], database_url=url, data_dir=data_dir,
                            queue_prefix=f"b{uuid.uuid4().hex[:8]}-", **overrides)  # fmt: skip
        upgrade(settings)
        app = create_app(settings, set_as_current=False)
        with app.connection_for_write() as connection:
            channel = connection.channel()
            app.topology.declare_all(channel)
            channel.close()
        try:
            yield app
        finally:
            recorder.close_all()
            with app.connection_for_write() as connection:
                channel = connection.channel()
                app.topology.delete_all(channel)
                channel.close()
            app.close()


def pickup(app: Any, jobs: int, interval: float, out: Path) -> dict[str, list[float]]:
    """Outbox commit -> confirmed publish, and plain delay() call times (seconds)."""
    noop = app.tasks["demo.noop"]
    sessions = sessions_for(app)
    committed: dict[str, float] = {}
    direct: list[float] = []
    with relay_process(app, out):
        for number in range(jobs):
            with sessions.begin() as session:
                job_id = noop.apply_in(session).id
            committed[job_id] = time.monotonic()
            started = time.monotonic()
            noop.delay()
            direct.append(time.monotonic() - started)
            if number % 2:  # the relay's publish is not always racing the next submit
                time.sleep(interval)
        time.sleep(1.0)  # the last ones are published
    confirmed = json.loads(out.read_text())
    if len(confirmed) < jobs:
        raise RuntimeError(f"the relay published {len(confirmed)} of {jobs} jobs")
    outbox = [confirmed[job_id] - at for job_id, at in committed.items()]
    return {"outbox": outbox, "delay": direct}


def submit_rates(app: Any, jobs: int) -> dict[str, float]:
    """jobs/s: delay(); apply_in one job per committed transaction; apply_in all in one."""
    noop = app.tasks["demo.noop"]
    sessions = sessions_for(app)
    started = time.perf_counter()
    for _ in range(jobs):
        noop.delay()
    delay_rate = jobs / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(jobs):
        with sessions.begin() as session:
            noop.apply_in(session)
    each = jobs / (time.perf_counter() - started)
    started = time.perf_counter()
    with sessions.begin() as session:
        for _ in range(jobs):
            noop.apply_in(session)
    batched = jobs / (time.perf_counter() - started)
    return {"delay": delay_rate, "outbox_one_per_transaction": each,
            "outbox_one_transaction": batched}  # fmt: skip


def confirm_rates(data_dir: Path, jobs: int, repeat: int) -> dict[str, float]:
    """RabbitMQ delay() jobs/s with publisher confirms and without (median of ``repeat``)."""
    rates: dict[str, list[float]] = {"confirms": [], "no_confirms": []}
    for _ in range(repeat):
        for mode, values in rates.items():
            with platform("rabbitmq", data_dir) as app:
                app.conf.broker_transport_options["confirm_publish"] = mode == "confirms"
                noop = app.tasks["demo.noop"]
                noop.delay()  # connect first
                started = time.perf_counter()
                for _ in range(jobs):
                    noop.delay()
                values.append(jobs / (time.perf_counter() - started))
    return {mode: median(values) for mode, values in rates.items()}


def _ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


def _report(results: dict[str, Any], args: argparse.Namespace) -> bool:
    print(f"\n### Outbox vs delay() ({args.jobs} jobs at ~{args.rate}/s for the latency, "
          f"{args.submit_jobs} for the submit rates; PostgreSQL history, no worker)")  # fmt: skip
    print("| broker | measure | outbox | delay() (same run) | ratio | target |")
    print("|---|---|---|---|---|---|")
    met = True
    for broker, figures in results["brokers"].items():
        lat, rates = figures["latency"], figures["submit"]
        ok = lat["outbox_p99"] <= TARGET_P99
        met &= ok
        print(f"| {broker} | pickup p50 (commit -> confirmed publish) | "
              f"{_ms(lat['outbox_p50'])} | publish p50 {_ms(lat['delay_p50'])} | "
              f"{lat['outbox_p50'] / lat['delay_p50']:.1f}x | |")  # fmt: skip
        print(f"| {broker} | pickup p99 | {_ms(lat['outbox_p99'])} | publish p99 "
              f"{_ms(lat['delay_p99'])} | {lat['outbox_p99'] / lat['delay_p99']:.1f}x "
              f"| <= 50 ms {'met' if ok else 'MISSED'} |")  # fmt: skip
        print(f"| {broker} | submit, one job per transaction | "
              f"{rates['outbox_one_per_transaction']:,.0f} jobs/s | {rates['delay']:,.0f} jobs/s "
              f"| {rates['outbox_one_per_transaction'] / rates['delay']:.2f}x | |")  # fmt: skip
        print(f"| {broker} | submit, all in one transaction | "
              f"{rates['outbox_one_transaction']:,.0f} jobs/s | {rates['delay']:,.0f} jobs/s "
              f"| {rates['outbox_one_transaction'] / rates['delay']:.2f}x | |")  # fmt: skip
    confirms = results["rabbitmq_confirms"]
    print(f"\n### delay() on RabbitMQ: publisher confirms ({args.confirm_jobs} jobs, median of "
          f"{args.repeat})")  # fmt: skip
    print("| confirms on (default) | confirms off | ratio |")
    print("|---|---|---|")
    print(f"| {confirms['confirms']:,.0f} jobs/s | {confirms['no_confirms']:,.0f} jobs/s | "
          f"{confirms['confirms'] / confirms['no_confirms']:.2f}x |")  # fmt: skip
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400, help="jobs for the pickup latency")
    parser.add_argument("--rate", type=int, default=50, help="outbox jobs/s submitted meanwhile")
    parser.add_argument("--submit-jobs", type=int, default=1000, help="jobs per submit rate")
    parser.add_argument("--confirm-jobs", type=int, default=3000, help="jobs per confirm rate")
    parser.add_argument("--repeat", type=int, default=3, help="confirm runs per mode (median)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--serve-relay", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_relay:
        serve_relay(args.serve_relay)
        return 0
    results: dict[str, Any] = {"brokers": {}}
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        for broker in BROKERS:
            with platform(broker, Path(tmp) / broker, history_enabled=True) as app:
                # pairs of (outbox, delay) with a pause after every second one: ~rate jobs/s
                times = pickup(app, args.jobs, 2.0 / args.rate, Path(tmp) / f"{broker}.json")
                rates = submit_rates(app, args.submit_jobs)
            outbox, direct = times["outbox"], times["delay"]
            results["brokers"][broker] = {
                "latency": {"outbox_p50": median(outbox), "outbox_p99": percentile(outbox, 0.99),
                            "delay_p50": median(direct), "delay_p99": percentile(direct, 0.99)},
                "submit": rates,
            }  # fmt: skip
            print(f"  {broker}: done", flush=True)
        results["rabbitmq_confirms"] = confirm_rates(Path(tmp) / "confirms", args.confirm_jobs,
                                                     args.repeat)  # fmt: skip
    met = _report(results, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\ntargets {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
