"""A real ``celery -A tasks_platform beat`` with a worker, on Redis and on RabbitMQ.

Beat sends the user's every-second entry and the platform's own periodic jobs (short intervals
here); the history shows the user's jobs with their tenant and priority, a stats snapshot row
appears, and a job (and a snapshot) of 40 days ago are cleaned up while a recent job is kept.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy
from conftest import Platform, stop_process, wait_for
from control_helpers import BROKERS, audit_entries, control_platform, insert, job_row
from sqlalchemy.orm import Session

from tasks_platform.history.models import Job, StatsSnapshot
from tasks_platform.process import settings_env
from tasks_platform.schedules import state_file


@contextmanager
def beat(platform: Platform, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A tasks_platform beat`` with the platform's settings; stopped with SIGTERM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    env.update(settings_env(platform.settings))
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks_platform", "beat", "-l", "INFO"],
            env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        stop_process(process, timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def ticks(platform: Platform) -> list[Job]:
    with Session(platform.history) as session:
        query = sqlalchemy.select(Job).where(Job.name == "demo.noop", Job.state == "succeeded")
        return list(session.scalars(query).all())


def snapshots(platform: Platform) -> list[StatsSnapshot]:
    with Session(platform.history) as session:
        return list(session.scalars(sqlalchemy.select(StatsSnapshot)).all())


def finished_job(job_id: str, days_ago: float) -> Job:
    at = datetime.now(UTC) - timedelta(days=days_ago)
    return Job(id=job_id, name="demo.work", queue="default", state="succeeded", progress=5,
               attempts=1, queued_at=at, started_at=at, finished_at=at, updated_at=at)  # fmt: skip


@pytest.mark.parametrize("broker", BROKERS)
def test_beat_runs_user_schedules_snapshots_stats_and_cleans_old_history(
    broker: str, tmp_path: Path
) -> None:
    schedule = [{"name": "tick", "job": "demo.noop", "every": 1, "tenant": "acme",
                 "priority": "high"}]  # fmt: skip
    with control_platform(broker, tmp_path, schedules=schedule, cleanup_interval=2,
                          stats_snapshot_interval=2, history_retention_days=30,
                          history_flush_interval=0.2) as platform:  # fmt: skip
        old_snapshot = StatsSnapshot(at=datetime.now(UTC) - timedelta(days=40), figures={})
        insert(platform, finished_job("old-job", days_ago=40), finished_job("recent-job", 1),
               old_snapshot)  # fmt: skip
        assert len(snapshots(platform)) == 1
        platform.worker(pool="threads", concurrency=2)

        with beat(platform, tmp_path / "beat.log") as process:
            wait_for(lambda: len(ticks(platform)) >= 3, 40, what="three scheduled ticks")
            wait_for(lambda: job_row(platform, "old-job") is None, 20, what="the cleanup")
            wait_for(lambda: snapshots(platform), 20, what="a stats snapshot")
            month_ago = datetime.now(UTC) - timedelta(days=30)
            wait_for(lambda: all(s.at > month_ago for s in snapshots(platform)), 20,
                     what="the old snapshot to be cleaned up")  # fmt: skip
            assert process.poll() is None, (tmp_path / "beat.log").read_text()
            process.send_signal(signal.SIGTERM)  # beat saves its state and exits cleanly
            assert process.wait(timeout=15) == 0

        # every run, recorded as beat published it: the entry's tenant and priority
        assert {(t.tenant, t.priority, t.queue) for t in ticks(platform)} == {
            ("acme", "high", "default")
        }
        assert job_row(platform, "recent-job") is not None  # within the retention: kept
        cleanups = [e for e in audit_entries(platform) if e.action == "history.clean"]
        assert cleanups
        assert cleanups[0].actor == "beat"
        assert cleanups[0].detail is not None
        assert cleanups[0].detail["older_than_seconds"] == 30 * 86400
        figures = snapshots(platform)[0].figures
        assert set(figures) >= {"taken_at", "queues", "dead_letters", "workers", "window",
                                "health"}  # fmt: skip
        assert "default" in figures["queues"]
        with Session(platform.history) as session:
            platform_runs = session.scalars(
                sqlalchemy.select(Job).where(Job.name.like("platform.%"))
            ).all()
        assert {(job.name, job.priority) for job in platform_runs} >= {
            ("platform.clean_history", "low"),
            ("platform.stats_snapshot", "low"),
        }
        assert list(Path(state_file(platform.settings)).parent.glob("beat-schedule*"))


def test_beat_refuses_to_start_on_a_schedule_naming_an_unknown_job(tmp_path: Path) -> None:
    schedule = [{"name": "typo", "job": "demo.nope", "every": 1}]
    with control_platform("redis", tmp_path, schedules=schedule) as platform:
        log = tmp_path / "beat.log"
        with beat(platform, log) as process:
            assert process.wait(timeout=60) == 1
        text = log.read_text()
        assert "beat cannot start: TASKS_SCHEDULES: schedule 'typo': no job type named" in text
        assert "Traceback" not in text
