"""The platform's own periodic jobs, which beat sends (see :mod:`tasks_platform.schedules`).

- ``platform.clean_history`` deletes the history of jobs that ended more than
  ``history_retention_days`` ago (the same audited clean-up as ``tasks-platform clean``, with
  ``beat`` as the actor), and the stats snapshots older than that;
- ``platform.stats_snapshot`` stores the stats module's figures (queues, dead letters,
  workers, the job figures of the last ``stats_snapshot_interval`` seconds, and the health
  verdict) as one ``stats_snapshots`` row.

Both run on the ``default`` queue at low priority; a run that no worker took before the next
one is due expires (the schedule says so).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

from celery import current_task
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.control import Control
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import StatsSnapshot
from tasks_platform.jobs.declaration import JobContext, job
from tasks_platform.jobs.retry import RetryPolicy
from tasks_platform.settings import Settings
from tasks_platform.stats import Stats

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

#: who the scheduled clean-up is in the audit log
ACTOR = "beat"
#: a database that does not answer now may answer in a moment
RETRY = RetryPolicy(max_retries=3, transient=(OperationalError,))


class CleanHistory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: days of history to keep; TASKS_HISTORY_RETENTION_DAYS when not given
    retention_days: float | None = Field(default=None, gt=0, le=36_525)


class TakeStatsSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: how far back the job figures look; TASKS_STATS_SNAPSHOT_INTERVAL when not given
    window_seconds: float | None = Field(default=None, gt=0, le=366 * 86400)


@contextmanager
def _sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = create_history_engine(settings)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


def _app() -> PlatformCelery:
    """The app of the job running in this thread (a process may hold several)."""
    return cast("PlatformCelery", current_task.app)


@job("platform.clean_history", queue="default", schema=CleanHistory, retry=RETRY,
     priority="low", bind=True)  # fmt: skip
def clean_history(context: JobContext, payload: CleanHistory) -> dict[str, object]:
    """Delete the jobs that ended before the retention period (audited), and old snapshots."""
    days = payload.retention_days or context.settings.history_retention_days
    with _sessions(context.settings) as sessions:
        deleted = Control(_app(), sessions).clean(timedelta(days=days), actor=ACTOR)
        with sessions.begin() as session:
            cutoff = datetime.now(UTC) - timedelta(days=days)
            gone = session.execute(delete(StatsSnapshot).where(StatsSnapshot.at < cutoff))
            snapshots = int(getattr(gone, "rowcount", 0))
    return {"deleted": deleted, "snapshots_deleted": snapshots, "retention_days": days}


@job("platform.stats_snapshot", queue="default", schema=TakeStatsSnapshot, retry=RETRY,
     priority="low", bind=True)  # fmt: skip
def stats_snapshot(context: JobContext, payload: TakeStatsSnapshot) -> dict[str, object]:
    """Store the figures of this moment (and of the last window) as a stats_snapshots row."""
    seconds = payload.window_seconds or context.settings.stats_snapshot_interval
    with _sessions(context.settings) as sessions:
        stats = Stats(_app(), sessions)
        snapshot = stats.snapshot(window=timedelta(seconds=seconds))
        verdict = stats.verdict(snapshot)
        row = StatsSnapshot(
            at=snapshot.taken_at, figures=snapshot.as_dict() | {"health": verdict.as_dict()}
        )
        with sessions.begin() as session:
            session.add(row)
    return {"snapshot_id": row.id, "at": snapshot.taken_at.isoformat(),
            "health": verdict.level.value, "unavailable": dict(snapshot.unavailable)}  # fmt: skip
