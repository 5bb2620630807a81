"""A fault scenario's workload: jobs with idempotency keys, and the checks made at the end.

Every job is a ``demo.work`` job whose label is its idempotency key; it records each run
(start, done, pid) and applies its side effect once per key (``effects_to``). At the end a
scenario checks: no job lost (every accepted key has its effect and a ``succeeded`` history
row), duplicate executions only where the caller's rule allows them, one effect per key, and
every history row terminal and correct. Its figures go to ``<TEST_FAULTS_REPORT_DIR or the
temporary directory>/tasks-platform-faults/<scenario>.json`` (``make faults`` prints them).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from conftest import Platform, make_platform, postgres_schema, wait_for
from sqlalchemy.orm import Session

from faults.report import REPORT_DIR
from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import Base, Job

#: job types whose rows must end ``succeeded``
JOB = "demo.work"


@dataclass
class Workload:
    """``jobs`` jobs of ``duration`` seconds on ``platform``, each with its own key."""

    platform: Platform
    scenario: str
    jobs: int
    duration: float = 0.05
    #: key -> job id, for every submission the producer was told was accepted
    accepted: dict[str, str] = field(default_factory=dict)
    #: what the producer was told when a submission was refused: error type -> count
    refusals: Counter[str] = field(default_factory=Counter)
    refusal_messages: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.keys = [f"{self.scenario}-{n:04d}" for n in range(self.jobs)]
        self.runs = self.platform.runs()
        self.effects = self.platform.tmp_path / "effects"

    # -- producing ---------------------------------------------------------------------------
    def submit(self, key: str) -> bool:
        """Submit the job of ``key`` once; False (and the error noted) if it was refused."""
        payload = {"label": key, "duration": self.duration, "record_to": str(self.runs.path),
                   "effects_to": str(self.effects)}  # fmt: skip
        try:
            result = self.platform.task(JOB).apply_async(kwargs=payload, idempotency_key=key)
        except Exception as exc:  # what a producer sees during an outage: counted, checked
            self.refusals[f"{type(exc).__module__}.{type(exc).__name__}"] += 1
            if len(self.refusal_messages) < 5:
                self.refusal_messages.append(str(exc)[:300])
            return False
        self.accepted[key] = str(result.id)
        return True

    def submit_all(self, *, pace: float = 0.0, patience: float = 60.0) -> None:
        """Submit every job, ``pace`` seconds apart; a refused one is submitted again with its
        key (as a producer should) until accepted or ``patience`` seconds ran out."""
        for key in self.keys:
            deadline = time.monotonic() + patience
            while not self.submit(key) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pace:
                time.sleep(pace)

    def submit_in_background(self, **options: Any) -> threading.Thread:
        producer = threading.Thread(target=self.submit_all, kwargs=options, daemon=True)
        producer.start()
        return producer

    # -- observing ---------------------------------------------------------------------------
    def applied(self) -> set[str]:
        """The keys whose effect was applied."""
        if not self.effects.is_dir():
            return set()
        return {path.read_text() for path in self.effects.glob("*.effect")}

    def done(self) -> int:
        return len(self.applied())

    def history_rows(self) -> dict[str, Job]:
        assert self.platform.history is not None
        with Session(self.platform.history) as session:
            ids = list(self.accepted.values())
            rows = session.scalars(sqlalchemy.select(Job).where(Job.id.in_(ids))).all()
            session.expunge_all()
        return {row.id: row for row in rows}

    def succeeded_rows(self) -> int:
        try:
            rows = self.history_rows()
        except sqlalchemy.exc.OperationalError:
            return 0  # the database is down or restarting
        return sum(1 for row in rows.values() if row.state == "succeeded")

    def wait_finished(self, timeout: float, *, history_timeout: float = 30.0) -> None:
        """Until every accepted job applied its effect, then until its history row says
        succeeded (for at most ``history_timeout`` seconds more: :meth:`check` says which not)."""
        total = len(self.accepted)
        wait_for(lambda: self.done() >= total, timeout,
                 what=f"{total} effects (have {self.done()})", interval=0.25)  # fmt: skip
        deadline = time.monotonic() + history_timeout
        while self.succeeded_rows() < total and time.monotonic() < deadline:
            time.sleep(0.5)

    # -- checking ----------------------------------------------------------------------------
    def check(self, *, duplicate_allowed: Callable[[list[list[str]]], bool]) -> dict[str, Any]:
        """Assert nothing was lost or done twice; the figures, also written as JSON.

        ``duplicate_allowed`` gets the start records (label, attempt, pid, "start", time) of
        a job that ran more than once, in time order, and says whether at-least-once delivery
        allows it (its earlier runs were cut short by the fault).
        """
        assert len(self.accepted) == self.jobs, (
            f"refused for good: {self.jobs - len(self.accepted)}"
        )
        applied = self.applied()
        lost = sorted(set(self.accepted) - applied)
        starts: dict[str, list[list[str]]] = {}
        for record in self.runs.starts():
            starts.setdefault(record[0], []).append(record)
        repeated = {key: sorted(runs, key=lambda r: float(r[4]))
                    for key, runs in starts.items() if len(runs) > 1}  # fmt: skip
        unexplained = sorted(key for key, runs in repeated.items() if not duplicate_allowed(runs))
        outcomes = self._effect_outcomes()
        twice = sorted(digest for digest, count in outcomes["applied"].items() if count > 1)
        rows = self.history_rows()
        wrong = sorted(
            f"{key}: {_describe(row)}"
            for key, job_id in self.accepted.items()
            if (row := rows.get(job_id)) is None or not _correct(row, key)
        )
        figures = {
            "scenario": self.scenario,
            "broker": self.platform.broker,
            "jobs_submitted": len(self.accepted),
            "submissions_refused": sum(self.refusals.values()),
            "refusal_errors": dict(self.refusals),
            "refusal_examples": self.refusal_messages,
            "jobs_lost": len(lost),
            "executions": sum(len(runs) for runs in starts.values()),
            "duplicate_executions": sum(len(runs) - 1 for runs in repeated.values()),
            "unexplained_duplicates": len(unexplained),
            "effects": len(applied),
            "duplicate_effects": len(twice),
            "repeats_absorbed_by_key": sum(outcomes["repeated"].values()),
            "history_terminal_and_correct": len(rows) - len(wrong),
            "history_wrong": len(wrong),
            "faults": self.faults,
            "seconds": round(time.monotonic() - self.started, 1),
        }
        write_figures(figures)
        assert lost == [], f"lost jobs: {lost[:10]}"
        assert unexplained == [], f"duplicates no fault explains: {unexplained[:10]}"
        assert twice == [], f"keys whose effect was applied twice: {twice[:10]}"
        assert len(applied) == self.jobs, f"{len(applied)} effects for {self.jobs} keys"
        assert wrong == [], f"history rows not terminal/correct: {wrong[:10]}"
        return figures

    def _effect_outcomes(self) -> dict[str, Counter[str]]:
        outcomes: dict[str, Counter[str]] = {"applied": Counter(), "repeated": Counter()}
        log = self.effects / "effects.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            digest, outcome, _pid = line.split()
            outcomes[outcome][digest] += 1
        return outcomes


def _describe(row: Job | None) -> str:
    if row is None:
        return "no row"
    return f"{row.state} attempts={row.attempts} progress={row.progress} worker={row.worker}"


def _correct(row: Job, key: str) -> bool:
    return (
        row.state == "succeeded"
        and row.name == JOB
        and row.idempotency_key == key
        and row.finished_at is not None
        and row.started_at is not None
        and (row.attempts or 0) >= 1
        and (row.result or {}).get("label") == key
    )


def write_figures(figures: dict[str, Any]) -> None:
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    name = f"{figures['scenario']}-{figures['broker']}.json"
    (REPORT_DIR / name).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"fault scenario figures: {json.dumps(figures)}")


@contextmanager
def fault_platform(
    broker: str, tmp_path: Path, *, database: str | None = None, **overrides: Any
) -> Iterator[Platform]:
    """A platform on ``broker`` whose history is a fresh schema of ``database`` (else of the
    shared PostgreSQL); ``platform.history`` is an engine on it."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_schema(database) if database else postgres_schema())
        platform = stack.enter_context(make_platform(broker, tmp_path, database_url=url,
                                                     **overrides))  # fmt: skip
        engine = create_history_engine(platform.settings)
        stack.callback(engine.dispose)
        Base.metadata.create_all(engine)
        platform.history = engine
        yield platform


@contextmanager
def fresh_schema(database: str) -> Iterator[str]:
    """A URL of ``database`` whose tables live in a fresh schema (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(database)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{database}?options=-csearch_path%3D{name}"
    finally:
        with contextlib.suppress(sqlalchemy.exc.OperationalError), engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{name}" CASCADE'))
        engine.dispose()
