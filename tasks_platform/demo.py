"""The main job: run a worker, push a realistic mixed workload through it, report per queue.

``tasks-platform demo`` starts a real worker process on the configured broker (the embedded
file broker when nothing is configured), submits a few hundred jobs across the job families
and priorities (some failing transiently, a few for good), shows progress from the worker's
events, and ends with a per-queue table. It exits 0 only if every job ended as planned:
succeeded, or dead-lettered exactly once. Its closing figures come from the history database
and the stats module (what ``tasks-platform stats`` prints), not from counters of its own; the
worker events only drive the progress lines. It uses its own queue prefix (or its own data
folder) and removes it afterwards, so it never touches other jobs on a shared broker.
"""

from __future__ import annotations

import random
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import sqlalchemy
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.application import PlatformCelery, create_app
from tasks_platform.errors import InvalidPayload
from tasks_platform.history import migrations, recorder
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import TERMINAL_STATES, Job
from tasks_platform.process import WorkerProcess
from tasks_platform.settings import Settings, load_settings
from tasks_platform.stats import Stats
from tasks_platform.stats.history import window_figures
from tasks_platform.stats.report import format_by_queue, format_snapshot, format_verdict
from tasks_platform.submit import submit
from tasks_platform.topology import QUEUES

DEMO_MAX_RETRIES = 3  # the demo family's retry policy


@dataclass(frozen=True)
class Planned:
    job: str
    family: str
    payload: dict[str, Any]
    priority: str
    expect: str  # "succeeded" | "dead"


_MIX: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    # job, family, count, priorities
    ("demo.generate_text", "ai", 60, ("normal", "high")),
    ("demo.send_email", "email", 70, ("high", "normal")),
    ("reports.render", "reports", 40, ("low", "normal")),
    ("demo.deliver_webhook", "webhooks", 60, ("normal",)),
    ("demo.charge_card", "payments", 30, ("critical",)),
    ("demo.work", "default", 40, ("low", "normal")),
)


def plan(rng: random.Random, scale: float = 1.0) -> list[Planned]:
    """The workload: per family, mostly healthy jobs, some flaky, a few hopeless."""
    jobs: list[Planned] = []
    for name, family, count, priorities in _MIX:
        for number in range(max(1, round(count * scale))):
            priority = rng.choice(priorities)
            label = f"{family}-{number}"
            if name == "reports.render":
                rows = [[f"item {i}", rng.randint(1, 99), round(rng.random() * 100, 2)]
                        for i in range(rng.randint(1, 50))]  # fmt: skip
                payload: dict[str, Any] = {
                    "title": f"Report {number}", "columns": ["item", "qty", "price"], "rows": rows,
                }  # fmt: skip
                jobs.append(Planned(name, family, payload, priority, "succeeded"))
                continue
            roll = rng.random()
            fail_times = 0
            permanent = False
            if roll < 0.04:
                permanent = True  # e.g. a webhook endpoint answering 410 Gone
            elif roll < 0.07:
                fail_times = DEMO_MAX_RETRIES + 2  # an outage longer than the retries
            elif roll < 0.30:
                fail_times = rng.randint(1, 2)  # a blip: retried, then fine
            payload = {
                "label": label, "duration": round(rng.uniform(0.005, 0.05), 3),
                "fail_times": fail_times, "fail_permanently": permanent,
            }  # fmt: skip
            expect = "dead" if permanent or fail_times > DEMO_MAX_RETRIES else "succeeded"
            jobs.append(Planned(name, family, payload, priority, expect))
    rng.shuffle(jobs)
    return jobs


@dataclass
class Tracker:
    """Job outcomes as the worker's events tell them, for the progress lines."""

    outcome: dict[str, str] = field(default_factory=dict)
    retries: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_event(self, event: dict[str, Any]) -> None:
        kind, task_id = event.get("type", ""), event.get("uuid")
        if not task_id:
            return
        with self.lock:
            if kind == "task-retried":
                self.retries[task_id] += 1
            elif kind == "task-succeeded":
                self.outcome[task_id] = "succeeded"
            elif kind == "task-dead-lettered":
                self.outcome[task_id] = "dead"

    def snapshot(self) -> Counter[str]:
        with self.lock:
            counts = Counter(self.outcome.values())
            counts["retries"] = sum(self.retries.values())
            return counts


class _Listener(threading.Thread):
    def __init__(self, app: PlatformCelery, tracker: Tracker) -> None:
        super().__init__(name="demo-events", daemon=True)
        self.app, self.tracker = app, tracker
        self.ready = threading.Event()
        self.receiver: Any = None

    def run(self) -> None:
        with self.app.connection_for_read() as connection:
            receiver = self.app.events.Receiver(connection, handlers={"*": self.tracker.on_event})
            receiver.on_consume_ready = self._on_ready  # subscribed: no event is missed from now
            self.receiver = receiver
            for _ in receiver.consume(limit=None, timeout=None, wakeup=False):
                pass

    def _on_ready(self, *args: Any, **kwargs: Any) -> None:
        self.ready.set()

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(timeout=5)


def run_demo(*, scale: float = 1.0, timeout: float = 240.0, out: TextIO = sys.stdout) -> int:
    base = load_settings()
    run_id = uuid.uuid4().hex[:6]
    settings = _demo_settings(base, run_id)
    problem = _history_problem(settings)
    if problem is not None:
        print(problem, file=out)
        return 2
    app = create_app(settings, set_as_current=False)
    where = "the embedded file broker" if settings.embedded else settings.broker_kind.value
    print(f"tasks-platform demo on {where} (run {run_id})", file=out)
    tracker = Tracker()
    listener = _Listener(app, tracker)
    worker = WorkerProcess(settings, concurrency=2, loglevel="WARNING")
    engine = create_history_engine(settings)
    try:
        listener.start()
        if not listener.ready.wait(30):
            print("could not subscribe to worker events", file=out)
            return 1
        worker.start(app)
        jobs = plan(random.Random(7), scale)
        began = datetime.now(UTC)
        started = time.monotonic()
        ids = _submit_all(app, jobs, out)
        done = _wait(tracker, ids, started, timeout, out)
        elapsed = time.monotonic() - started
        sessions = session_factory(engine)
        states = _recorded_states(sessions, ids, out)
        stats = Stats(app, sessions)
        snapshot = stats.snapshot(window=datetime.now(UTC) - began)
        print(f"\n{len(jobs)} jobs in {elapsed:.1f}s ({len(jobs) / elapsed:.0f} jobs/s); figures "
              "from the history and the broker, as `tasks-platform stats` shows them:\n",
              file=out)  # fmt: skip
        print(format_snapshot(snapshot), file=out)
        with sessions() as session:
            by_queue = window_figures(session, since=began, until=datetime.now(UTC), by=Job.queue)
        print(f"\nper queue, from the history:\n{format_by_queue(by_queue)}", file=out)
        print(f"\nhealth: {format_verdict(stats.verdict(snapshot))}\n", file=out)
        planned = _as_planned(out, jobs, ids, states, dict(snapshot.dead_letters))
        return 0 if done and planned else 1
    finally:
        worker.stop()
        listener.stop()
        recorder.close_all()  # the producer's transitions are written before the folder goes
        engine.dispose()
        _clean_up(app, settings, base)


def _history_problem(settings: Settings) -> str | None:
    """Why the demo cannot read its figures from a configured history database, if it cannot
    (the embedded SQLite history is brought to the current schema by the recorder)."""
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        return None
    shown = sqlalchemy.make_url(url).render_as_string(hide_password=True)
    try:
        if migrations.is_current(settings):
            return None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return f"the history database {shown} cannot be reached ({type(cause).__name__})"
    return (f"the history database {shown} is not at the current schema: run "
            "`tasks-platform db upgrade` first")  # fmt: skip


def _demo_settings(base: Settings, run_id: str) -> Settings:
    """A data folder of its own (its SQLite history, unless a database is configured), and
    on a server broker a queue prefix of its own."""
    update: dict[str, Any] = {"data_dir": base.data_dir / f"demo-{run_id}"}
    if not base.embedded:
        update["queue_prefix"] = f"{base.queue_prefix}demo-{run_id}-"
    return base.model_copy(update=update)


def _submit_all(app: PlatformCelery, jobs: list[Planned], out: TextIO) -> dict[str, Planned]:
    ids: dict[str, Planned] = {}
    for planned in jobs:
        job_id = submit(planned.job, planned.payload, priority=planned.priority, app=app)
        ids[job_id] = planned
    try:  # bad input is refused at the door, before anything is queued
        submit("reports.render", {"title": "", "columns": []}, app=app)
    except InvalidPayload as exc:
        print(f"refused at submit, as it should be: {exc}", file=out)
    print(f"submitted {len(ids)} jobs across {len(QUEUES)} queues", file=out)
    return ids


def _wait(
    tracker: Tracker, ids: dict[str, Planned], started: float, timeout: float, out: TextIO
) -> bool:
    last = ""
    while time.monotonic() - started < timeout:
        counts = tracker.snapshot()
        finished = counts["succeeded"] + counts["dead"]
        line = (f"  {finished:4d}/{len(ids)} finished: {counts['succeeded']} succeeded, "
                f"{counts['dead']} dead-lettered, {counts['retries']} retries "
                f"({time.monotonic() - started:5.1f}s)")  # fmt: skip
        if line != last:
            print(line, file=out, flush=True)
            last = line
        if all(job_id in tracker.outcome for job_id in ids):
            return True
        time.sleep(1.0)
    print(f"timed out after {timeout:.0f}s", file=out)
    return False


def _recorded_states(
    sessions: sessionmaker[Session], ids: dict[str, Planned], out: TextIO, timeout: float = 30.0
) -> dict[str, str]:
    """Each job's state in the history, once every job is terminal there (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    terminal = [state.value for state in TERMINAL_STATES]
    while True:
        states: dict[str, str] = {}
        with sessions() as session:
            for chunk in _chunks(list(ids), 500):
                query = sqlalchemy.select(Job.id, Job.state).where(Job.id.in_(chunk))
                states.update((job_id, state) for job_id, state in session.execute(query))
        if all(states.get(job_id) in terminal for job_id in ids) or time.monotonic() > deadline:
            missing = sum(states.get(job_id) not in terminal for job_id in ids)
            if missing:
                print(f"{missing} job(s) have no terminal row in the history", file=out)
            return states
        time.sleep(0.2)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _as_planned(
    out: TextIO, jobs: list[Planned], ids: dict[str, Planned], states: dict[str, str],
    dead_counts: dict[str, int],
) -> bool:  # fmt: skip
    """Every job's recorded state is the planned one, and each dead job is in its Q.dead once."""
    wrong = [i for i, planned in ids.items() if states.get(i) != planned.expect]
    expected_dead = Counter(p.family for p in jobs if p.expect == "dead")
    if wrong:
        print(f"{len(wrong)} job(s) did not end as planned, e.g. {wrong[:3]}", file=out)
    if dict(expected_dead) != {f: n for f, n in dead_counts.items() if n}:
        print(f"dead-letter queues hold {dead_counts}; expected {dict(expected_dead)}", file=out)
        return False
    if not wrong:
        print("every job ended as planned; each hopeless one is in its Q.dead once", file=out)
    return not wrong


def _clean_up(app: PlatformCelery, settings: Settings, base: Settings) -> None:
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    if settings.embedded:
        return
    with app.connection_for_write() as connection:
        channel = connection.channel()
        try:
            app.topology.delete_all(channel)
        finally:
            channel.close()
