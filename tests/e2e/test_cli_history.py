"""The history, stats and health commands, run as a user runs them: a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Platform, make_platform, postgres_schema

from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import Base, Job, JobEvent
from tasks_platform.process import settings_env

CLI = [sys.executable, "-m", "tasks_platform"]


def _run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")} | env
    return subprocess.run(
        [*CLI, *args], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Platform]:
    """An embedded broker and a SQLite history (tables created) under tmp_path: no server."""
    with make_platform("embedded", tmp_path, history_enabled=False) as platform:
        _create_tables(platform)
        yield platform


def _create_tables(platform: Platform) -> None:
    engine = create_history_engine(platform.settings)
    Base.metadata.create_all(engine)
    engine.dispose()


def _insert(platform: Platform, *rows: Job | JobEvent) -> None:
    engine = create_history_engine(platform.settings)
    try:
        with session_factory(engine)() as session:
            session.add_all(rows)
            session.commit()
    finally:
        engine.dispose()


def _now() -> datetime:
    """The wall clock, as the command reads it (the history figures look back from it)."""
    return datetime.now(UTC).replace(microsecond=0)


def _job(
    job_id: str, *, state: str = "succeeded", minutes_ago: float = 1, **columns: object
) -> Job:
    at = _now() - timedelta(minutes=minutes_ago)
    values: dict[str, object] = {
        "name": "demo.work",
        "queue": "default",
        "updated_at": at,
        "queued_at": at,
        "finished_at": at,
    } | columns
    return Job(id=job_id, state=state, **values)


def test_health_exits_0_when_healthy_1_on_warnings_2_when_critical(embedded: Platform) -> None:
    env = settings_env(embedded.settings)

    healthy = _run(env, "health")
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "healthy"), healthy.stderr

    _insert(embedded, *(_job(f"d{n}", state="dead", name="email.send") for n in range(11)))
    _insert(
        embedded,
        *(
            JobEvent(
                id=str(uuid.uuid4()),
                job_id=f"d{n}",
                state="dead",
                attempt=1,
                at=_now() - timedelta(minutes=1),
            )
            for n in range(11)
        ),
    )
    warning = _run(env, "health", "--json")
    assert warning.returncode == 1, warning.stderr
    verdict = json.loads(warning.stdout)
    assert verdict["level"] == "warning"
    assert [(a["rule"], a["subject"], a["value"]) for a in verdict["alerts"]] == [
        ("unsuccessful_jobs", "email.send", 11)
    ]
    assert _run(env, "health", "--window", "30s").returncode == 0  # outside a shorter window

    embedded.task("demo.work").delay(label="nobody-runs-me")  # and no worker consumes it
    critical = _run(env, "health")
    assert critical.returncode == 2, critical.stderr
    assert critical.stdout.startswith("critical: 2 alert(s)")
    assert "queue default: 1 message(s) waiting and no worker consumes it" in critical.stdout


def test_jobs_json_pages_and_filters_on_postgresql(tmp_path: Path) -> None:
    with (
        postgres_schema() as url,
        make_platform("embedded", tmp_path, history_enabled=False, database_url=url) as platform,
    ):
        _create_tables(platform)
        _insert(platform, *(_job(f"j{n:02d}", minutes_ago=n) for n in range(12)))
        _insert(
            platform,
            _job(
                "x1",
                state="dead",
                minutes_ago=90,
                name="email.send",
                tenant="acme",
                error_type="SMTPError",
            ),
        )
        env = settings_env(platform.settings)

        first = _run(env, "jobs", "--json", "--limit", "10")
        assert first.returncode == 0, first.stderr
        page = json.loads(first.stdout)
        assert [item["id"] for item in page["items"]] == [f"j{n:02d}" for n in range(10)]
        assert datetime.fromisoformat(page["items"][0]["queued_at"]).utcoffset() == timedelta(0)
        rest = json.loads(_run(env, "jobs", "--json", "--after", page["next_cursor"]).stdout)
        assert [item["id"] for item in rest["items"]] == ["j10", "j11", "x1"]
        assert rest["next_cursor"] is None

        dead = json.loads(_run(env, "jobs", "--json", "--state", "dead", "--tenant", "acme").stdout)
        assert [(i["id"], i["name"], i["error_type"]) for i in dead["items"]] == [
            ("x1", "email.send", "SMTPError")
        ]
        recent = json.loads(_run(env, "jobs", "--json", "--since", "1h").stdout)
        assert len(recent["items"]) == 12
        assert json.loads(_run(env, "jobs", "--json", "--job", "nope").stdout)["items"] == []


def test_jobs_and_job_print_tables_and_refuse_bad_input(embedded: Platform) -> None:
    _insert(embedded, *(_job(f"j{n}", minutes_ago=n) for n in range(3)))
    now = _now()
    _insert(
        embedded,
        JobEvent(id="e2", job_id="j0", state="succeeded", attempt=1, at=now),
        JobEvent(id="e1", job_id="j0", state="queued", attempt=0, at=now),
    )
    env = settings_env(embedded.settings)

    table = _run(env, "jobs", "--limit", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["id", "job", "queue", "priority", "state"]
    assert [line.split()[0] for line in lines[2:4]] == ["j0", "j1"]
    assert "2 job(s)" in table.stdout
    assert "more: --after " in table.stdout

    shown = json.loads(_run(env, "job", "j0", "--json").stdout)
    assert shown["job"]["id"] == "j0"
    assert [e["state"] for e in shown["events"]] == ["queued", "succeeded"]
    assert "succeeded" in _run(env, "job", "j0").stdout

    missing = _run(env, "job", "nope")
    assert missing.returncode == 1
    assert "no job with id 'nope'" in missing.stderr
    bad_cursor = _run(env, "jobs", "--after", "bogus")
    assert (bad_cursor.returncode, bad_cursor.stderr.strip()) == (
        2,
        "error: malformed page cursor 'bogus'",
    )
    assert _run(env, "jobs", "--since", "soon").returncode == 2


def test_clean_deletes_jobs_that_ended_before_the_cutoff(embedded: Platform) -> None:
    _insert(embedded, _job("old", minutes_ago=8 * 24 * 60), _job("new", minutes_ago=60))
    env = settings_env(embedded.settings)

    result = _run(env, "clean", "--older-than", "7d")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deleted 1 job(s) that ended before ")
    remaining = json.loads(_run(env, "jobs", "--json").stdout)["items"]
    assert [item["id"] for item in remaining] == ["new"]
    assert _run(env, "clean").returncode == 2  # --older-than is required


def test_stats_as_json_table_and_prometheus(embedded: Platform) -> None:
    now = _now()
    _insert(embedded, _job("a", run_seconds=2.0, wait_seconds=0.5, started_at=now))
    _insert(embedded, JobEvent(id="e", job_id="a", state="succeeded", attempt=1, at=now))
    embedded.task("demo.work").delay(label="waiting")
    env = settings_env(embedded.settings)

    figures = json.loads(_run(env, "stats", "--json").stdout)
    assert figures["queues"]["default"]["depth"] == 1
    assert figures["window"]["total"]["succeeded"] == 1
    assert figures["health"]["level"] == "critical"

    table = _run(env, "stats", "--window", "1h")
    assert table.returncode == 0, table.stderr
    assert "demo.work" in table.stdout
    assert "health: critical" in table.stdout

    exposition = _run(env, "stats", "--prometheus").stdout.splitlines()
    assert 'tasks_queue_depth{queue="default",priority="all"} 1' in exposition
    assert "tasks_health_level 2" in exposition
    assert 'tasks_jobs_window{job="demo.work",state="succeeded"} 1' in exposition


def test_db_upgrade_creates_a_usable_history(tmp_path: Path) -> None:
    with make_platform("embedded", tmp_path, history_enabled=False) as platform:
        env = settings_env(platform.settings)

        upgrade = _run(env, "db", "upgrade")
        assert upgrade.returncode == 0, upgrade.stderr
        assert "is up to date" in upgrade.stdout

        listed = _run(env, "jobs", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == {"items": [], "next_cursor": None}
