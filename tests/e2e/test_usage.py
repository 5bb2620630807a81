"""Usage metering: exact figures per UTC day, tenant and job type on PostgreSQL and SQLite, and
the same figures from real worker runs through ``Stats.usage``, the CLI and the admin API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from api_server import make_token, run_cli, serve_api
from conftest import make_platform, postgres_schema, wait_for
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tasks_platform.history import migrations
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import Base, Job, JobState
from tasks_platform.history.writer import Transition, apply_transitions
from tasks_platform.settings import Settings
from tasks_platform.stats import Stats
from tasks_platform.stats.usage import usage_rows

DAY1, DAY2 = date(2024, 3, 1), date(2024, 3, 2)
API = "/api/v1"


def _at(day: date, seconds: float) -> float:
    return datetime.combine(day, datetime.min.time(), tzinfo=UTC).timestamp() + seconds


def _job(job_id: str, name: str, tenant: str, *steps: tuple[JobState, int, float, dict[str, Any]]
         ) -> list[Transition]:  # fmt: skip
    first = steps[0][2] - 1
    facts = {"name": name, "tenant": tenant, "queue": "default"}
    return [Transition(job_id, JobState.QUEUED, 1, first, facts=facts),
            *(Transition(job_id, state, attempt, at, facts=more)
              for state, attempt, at, more in steps)]  # fmt: skip


def _history() -> list[Transition]:
    """Two tenants, two job types, two days; jobs that did not end, or ended outside them."""
    S, R, OK = JobState.STARTED, JobState.RETRYING, JobState.SUCCEEDED
    tokens = {"prompt_tokens": 10, "completion_tokens": 20}
    return [
        *_job("a1", "ai.generate", "acme", (S, 1, _at(DAY1, 60), {}),
              (OK, 1, _at(DAY1, 61.5), {"run_seconds": 1.5, **tokens})),
        *_job("a2", "ai.generate", "acme", (S, 1, _at(DAY1, 100), {}),
              (R, 1, _at(DAY1, 100.5), {"run_seconds": 0.5}), (S, 2, _at(DAY1, 110), {}),
              (OK, 2, _at(DAY1, 111), {"run_seconds": 1.0, "prompt_tokens": 5,
                                       "completion_tokens": 7})),
        *_job("a3", "ai.generate", "acme", (S, 1, _at(DAY2, 10), {}),
              (JobState.FAILED, 1, _at(DAY2, 10.25), {"run_seconds": 0.25}),
              (JobState.DEAD, 1, _at(DAY2, 10.5), {"dead_reason": "rejected"})),
        *_job("w1", "demo.work", "acme", (JobState.CANCELLED, 1, _at(DAY1, 5), {})),
        *_job("g1", "demo.work", "globex", (S, 1, _at(DAY1, 1), {}),
              (OK, 1, _at(DAY1, 3), {"run_seconds": 2.0})),
        # the last moment of day 1, the first of day 2
        *_job("g2", "demo.work", "globex", (S, 1, _at(DAY1, 86_399), {}),
              (OK, 1, _at(DAY1, 86_399.5), {"run_seconds": 0.5})),
        *_job("g3", "demo.work", "globex", (S, 1, _at(DAY1, 86_399), {}),
              (OK, 1, _at(DAY2, 0), {"run_seconds": 1.0})),
        *_job("g4", "demo.work", "globex", (S, 1, _at(DAY2, 50), {})),  # still running
        *_job("g5", "demo.work", "globex", (S, 1, _at(DAY1, -10), {}),  # ended the day before
              (OK, 1, _at(DAY1, -5), {"run_seconds": 5.0})),
    ]  # fmt: skip


#: (day, tenant, job, jobs, succeeded, failed, cancelled, attempts, run s, prompt, completion)
EXPECTED = [
    (DAY1, "acme", "ai.generate", 2, 2, 0, 0, 3, 3.0, 15, 27),
    (DAY1, "acme", "demo.work", 1, 0, 0, 1, 0, 0.0, 0, 0),
    (DAY1, "globex", "demo.work", 2, 2, 0, 0, 2, 2.5, 0, 0),
    (DAY2, "acme", "ai.generate", 1, 0, 1, 0, 1, 0.25, 0, 0),
    (DAY2, "globex", "demo.work", 1, 1, 0, 0, 1, 1.0, 0, 0),
]


def _tuples(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [(r.day, r.tenant, r.job, r.jobs, r.succeeded, r.failed, r.cancelled, r.attempts,
             round(r.run_seconds, 6), r.prompt_tokens, r.completion_tokens)
            for r in rows]  # fmt: skip


@contextmanager
def _database(kind: str, tmp_path: Path) -> Iterator[Engine]:
    if kind == "sqlite":
        engine = create_history_engine(Settings(data_dir=tmp_path))
        Base.metadata.create_all(engine)
        yield engine
        engine.dispose()
        return
    with postgres_schema() as url:
        engine = create_history_engine(Settings(data_dir=tmp_path, database_url=url))
        Base.metadata.create_all(engine)
        try:
            yield engine
        finally:
            engine.dispose()


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_usage_per_day_tenant_and_job_type_is_exact(kind: str, tmp_path: Path) -> None:
    with _database(kind, tmp_path) as engine:
        history = _history()
        with Session(engine) as session, session.begin():
            apply_transitions(session, history[::2])  # two batches, each in any order
        with Session(engine) as session, session.begin():
            apply_transitions(session, list(reversed(history[1::2])))
        with Session(engine) as session, session.begin():
            apply_transitions(session, history)  # written again: nothing more is counted
        with Session(engine) as session:
            assert _tuples(usage_rows(session, since=DAY1, until=DAY2)) == EXPECTED
            acme = usage_rows(session, since=DAY1, until=DAY2, tenant="acme")
            assert _tuples(acme) == [e for e in EXPECTED if e[1] == "acme"]
            work = usage_rows(session, since=DAY1, until=DAY2, job="demo.work")
            assert _tuples(work) == [e for e in EXPECTED if e[2] == "demo.work"]
            day2 = usage_rows(session, since=DAY2, until=DAY2, tenant="globex")
            assert _tuples(day2) == [EXPECTED[4]]
            assert usage_rows(session, since=DAY2 + timedelta(days=1), until=date(2024, 4, 1)) == []
            with pytest.raises(ValueError, match="before it starts"):
                usage_rows(session, since=DAY2, until=DAY1)


def _submit(platform: Any, name: str, tenant: str, **payload: Any) -> str:
    return str(platform.task(name).apply_async(kwargs=payload, tenant=tenant).id)


def _ended(engine: Engine, ids: list[str]) -> bool:
    with Session(engine) as session:
        states = session.scalars(select(Job.state).where(Job.id.in_(ids))).all()
    return len(states) == len(ids) and set(states) <= {"succeeded", "dead"}


def test_usage_of_real_runs_through_stats_cli_and_api(tmp_path: Path) -> None:
    with postgres_schema() as url, make_platform("redis", tmp_path, database_url=url) as platform:
        settings = platform.settings
        migrations.upgrade(settings)
        engine = create_history_engine(settings)
        platform.history = engine
        platform.worker(pool="threads", concurrency=4, queues=["default", "ai"])
        llm = {"prompt_tokens": 11, "completion_tokens": 22}
        ids = [
            _submit(platform, "demo.generate_text", "acme", usage=llm),
            _submit(platform, "demo.generate_text", "acme", usage=llm, fail_times=1),
            _submit(platform, "demo.work", "acme", fail_permanently=True),
            _submit(platform, "demo.work", "globex", duration=0.4, progress_steps=2,
                    usage={"prompt_tokens": 3, "completion_tokens": 4}),
        ]  # fmt: skip
        wait_for(lambda: _ended(engine, ids), 60, what="the jobs to end")

        today = datetime.now(UTC).date()
        stats = Stats(platform.app, session_factory(engine))
        rows = stats.usage(since=today - timedelta(days=1), until=today)
        # summed over days: a run that crosses midnight UTC splits across two
        totals: dict[tuple[str | None, str], list[float]] = {}
        for r in rows:
            figures = [r.jobs, r.succeeded, r.failed, r.cancelled, r.attempts,
                       r.prompt_tokens, r.completion_tokens]  # fmt: skip
            known = totals.setdefault((r.tenant, r.job), [0] * len(figures))
            totals[(r.tenant, r.job)] = [a + b for a, b in zip(known, figures, strict=True)]
        assert totals == {
            ("acme", "demo.generate_text"): [2, 2, 0, 0, 3, 22, 44],
            ("acme", "demo.work"): [1, 0, 1, 0, 1, 0, 0],
            ("globex", "demo.work"): [1, 1, 0, 0, 1, 3, 4],
        }
        with Session(engine) as session:
            runs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
        assert sum(r.run_seconds for r in rows) == pytest.approx(
            sum(j.run_seconds_total or 0 for j in runs.values())
        )
        globex = next(r for r in rows if r.tenant == "globex")
        assert globex.run_seconds >= 0.4

        # the command line
        cli = run_cli(settings, "usage", "--days", "2", "--json")
        assert cli.returncode == 0, cli.stderr
        printed = json.loads(cli.stdout)
        assert printed["rows"] == [r.as_dict() for r in rows]
        table = run_cli(settings, "usage", "--tenant", "globex", "--job", "demo.work")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert [line.split()[1:5] for line in lines if "globex" in line] == [
            ["globex", "demo.work", "1", "1"]
        ]
        assert lines[-2].split()[:3] == ["total", "1", "1"]
        bad = run_cli(settings, "usage", "--days", "2", "--since", "2024-01-01")
        assert bad.returncode != 0
        assert "exclude each other" in bad.stderr
        shown = run_cli(settings, "job", ids[3])
        assert shown.returncode == 0, shown.stderr
        assert "progress: 100.0% (attempt 1) - attempt 1: step 2 of 2" in shown.stdout

        # the admin API: a tenant token sees its own tenant only, whatever it asks
        _, admin = make_token(settings, "admin")
        _, operator = make_token(settings, "operator")
        _, acme = make_token(settings, "tenant", tenant="acme")
        with serve_api(settings, tmp_path / "api.log") as api:
            with api.client(admin) as client:
                every = client.get(f"{API}/usage", params={"days": 2}).json()["rows"]
                job = client.get(f"{API}/jobs/{ids[3]}").json()["job"]
            with api.client(operator) as client:
                only = client.get(f"{API}/usage", params={"tenant": "globex", "days": 2})
            with api.client(acme) as client:
                asked = client.get(f"{API}/usage", params={"tenant": "globex", "days": 2})
                ranged = client.get(f"{API}/usage", params={"since": today.isoformat(),
                                                            "until": "2000-01-01"})  # fmt: skip
        assert every == printed["rows"]
        assert (job["percent"], job["prompt_tokens"], job["completion_tokens"]) == (100.0, 3, 4)
        assert job["run_seconds_total"] == runs[ids[3]].run_seconds_total
        assert {r["tenant"] for r in only.json()["rows"]} == {"globex"}
        assert asked.status_code == 200
        assert {r["tenant"] for r in asked.json()["rows"]} == {"acme"}
        assert [r for r in every if r["tenant"] == "acme"] == asked.json()["rows"]
        assert ranged.status_code == 400
        assert ranged.json()["error"]["code"] == "invalid_range"
        engine.dispose()
