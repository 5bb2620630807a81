"""Figures of a recent window, read from the job history (any SQLAlchemy session).

Outcomes are counted from ``job_events`` whose time falls in the window; throughput and run
times from the jobs that *finished* in it, wait times from the jobs that *started* in it.
Figures are per job type, or per any other column of ``jobs`` (``by=Job.queue``: per queue).
Quantiles are computed here, in Python, from the rows of the window: the same on PostgreSQL
and SQLite, at the cost of reading one float per job of the window.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from tasks_platform.history.models import Job, JobEvent, JobState
from tasks_platform.history.repository import as_utc
from tasks_platform.stats.snapshot import JobFigures, WindowFigures, quantiles

#: the name reported for jobs the history knows no name of
UNKNOWN_JOB = "unknown"
_COUNTED = (JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD,
            JobState.RETRYING)  # fmt: skip
_UNSUCCESSFUL = (JobState.FAILED, JobState.DEAD)


@dataclass
class _Tally:
    """What is known of one job type while the queries are read."""

    events: dict[str, int] = field(default_factory=dict)
    unsuccessful: int = 0
    finished: int = 0
    waits: list[float] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)


def window_figures(
    session: Session, *, since: datetime, until: datetime,
    by: InstrumentedAttribute[str | None] = Job.name,
) -> WindowFigures:  # fmt: skip
    """Outcomes, throughput and quantiles per job type (or per ``by``) over ``[since, until]``."""
    since, until = as_utc(since), as_utc(until)
    tallies: defaultdict[str, _Tally] = defaultdict(_Tally)
    _count_events(session, tallies, by, since=since, until=until)
    _count_unsuccessful(session, tallies, by, since=since, until=until)
    for name, run in _durations(session, by, Job.finished_at, Job.run_seconds, since, until):
        tallies[name].finished += 1
        if run is not None:
            tallies[name].runs.append(run)
    for name, wait in _durations(session, by, Job.started_at, Job.wait_seconds, since, until):
        if wait is not None:
            tallies[name].waits.append(wait)
    minutes = max((until - since).total_seconds() / 60, 1e-9)
    jobs = tuple(_figures(name, tallies[name], minutes) for name in sorted(tallies))
    return WindowFigures(
        since=since,
        until=until,
        jobs=jobs,
        total=_figures("total", _merged(tallies.values()), minutes),
    )


def _count_events(
    session: Session, tallies: defaultdict[str, _Tally], by: InstrumentedAttribute[str | None],
    *, since: datetime, until: datetime,
) -> None:  # fmt: skip
    query = (
        select(by, JobEvent.state, func.count())
        .join(Job, Job.id == JobEvent.job_id)
        .where(
            JobEvent.at >= since,
            JobEvent.at <= until,
            JobEvent.state.in_([str(s) for s in _COUNTED]),
        )
        .group_by(by, JobEvent.state)
    )
    for name, state, count in session.execute(query).all():
        events = tallies[name or UNKNOWN_JOB].events
        events[state] = events.get(state, 0) + int(count)


def _count_unsuccessful(
    session: Session, tallies: defaultdict[str, _Tally], by: InstrumentedAttribute[str | None],
    *, since: datetime, until: datetime,
) -> None:  # fmt: skip
    query = (
        select(by, func.count(distinct(JobEvent.job_id)))
        .join(Job, Job.id == JobEvent.job_id)
        .where(
            JobEvent.at >= since,
            JobEvent.at <= until,
            JobEvent.state.in_([str(s) for s in _UNSUCCESSFUL]),
        )
        .group_by(by)
    )
    for name, count in session.execute(query).all():
        tallies[name or UNKNOWN_JOB].unsuccessful += int(count)


def _durations(
    session: Session,
    by: InstrumentedAttribute[str | None],
    moment: InstrumentedAttribute[datetime | None],
    seconds: InstrumentedAttribute[float | None],
    since: datetime,
    until: datetime,
) -> list[tuple[str, float | None]]:
    """(job name or ``by``, duration) of every job whose ``moment`` falls in the window."""
    query = select(by, seconds).where(moment >= since, moment <= until)
    return [(name or UNKNOWN_JOB, value) for name, value in session.execute(query).all()]


def _merged(tallies: Iterable[_Tally]) -> _Tally:
    merged = _Tally()
    for tally in tallies:
        for state, count in tally.events.items():
            merged.events[state] = merged.events.get(state, 0) + count
        merged.unsuccessful += tally.unsuccessful
        merged.finished += tally.finished
        merged.waits += tally.waits
        merged.runs += tally.runs
    return merged


def _figures(name: str, tally: _Tally, minutes: float) -> JobFigures:
    return JobFigures(
        job=name,
        queued=tally.events.get(JobState.QUEUED, 0),
        finished=tally.finished,
        per_minute=tally.finished / minutes,
        succeeded=tally.events.get(JobState.SUCCEEDED, 0),
        failed=tally.events.get(JobState.FAILED, 0),
        dead=tally.events.get(JobState.DEAD, 0),
        retrying=tally.events.get(JobState.RETRYING, 0),
        unsuccessful=tally.unsuccessful,
        wait=quantiles(tally.waits),
        run=quantiles(tally.runs),
    )
