"""Periodic jobs: the beat schedule, built from the settings (``celery -A tasks_platform beat``).

The schedule is the platform's own periodic jobs plus the user's ``TASKS_SCHEDULES``:

- ``platform.clean_history`` every ``cleanup_interval`` seconds: deletes the history of jobs
  that ended more than ``history_retention_days`` ago (audited, actor ``beat``);
- ``platform.stats_snapshot`` every ``stats_snapshot_interval`` seconds: stores the stats
  module's figures as a ``stats_snapshots`` row;
- each :class:`~tasks_platform.settings.ScheduleEntry`: its job and payload, on a cron line
  (``m h dom mon dow``, UTC) or every so many seconds, with its priority and tenant.

Beat publishes through the job type's own ``apply_async``, as ``submit()`` does: the payload is
validated, and the history records the job with its tenant and priority.

A cron line that cannot be parsed, a name given twice, a job type nobody declared, or a
payload, priority or tenant the job type refuses is a
:class:`~tasks_platform.errors.ConfigurationError` that stops beat when it starts
(:class:`PlatformScheduler`) and fails ``tasks-platform schedules`` (:func:`effective_schedule`).
Workers and the API only log it (:func:`beat_jobs`): they do not run the schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from celery.beat import PersistentScheduler
from celery.schedules import ParseException, crontab, schedule

from tasks_platform.errors import ConfigurationError, InvalidPayload, UnknownJob
from tasks_platform.intake import declared_task
from tasks_platform.jobs.declaration import check_tenant
from tasks_platform.settings import ScheduleEntry, Settings
from tasks_platform.topology import Priority

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)

CLEAN_HISTORY = "platform.clean_history"
STATS_SNAPSHOT = "platform.stats_snapshot"
#: the name beat's state file has under the data folder
STATE_FILE = "beat-schedule"
#: the fields of a cron line, in order: their names, and Celery's
CRON_FIELDS = (
    ("minute", "minute"),
    ("hour", "hour"),
    ("day of month", "day_of_month"),
    ("month", "month_of_year"),
    ("day of week", "day_of_week"),
)
#: cron nicknames, as in cron(8)
CRON_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True)
class ScheduledJob:
    """One entry of the effective schedule: what to publish, and when."""

    name: str
    job: str
    timing: Any  # a celery schedule (every N seconds) or crontab
    description: str
    payload: dict[str, Any] = field(default_factory=dict)
    priority: str | None = None
    tenant: str | None = None
    #: seconds after which a job no worker took is dropped (the next run supersedes it)
    expires: float | None = None
    #: one of the platform's own periodic jobs
    builtin: bool = False

    def publish_options(self) -> dict[str, Any]:
        """Options for the job type's ``apply_async``."""
        options: dict[str, Any] = {}
        if self.priority is not None:
            options["priority"] = self.priority
        if self.tenant is not None:
            options["tenant"] = self.tenant
        if self.expires is not None:
            options["expires"] = self.expires
        return options

    def next_run(self, now: datetime | None = None) -> datetime:
        """When it runs next if beat starts at ``now``: cron lines are absolute times."""
        now = now or datetime.now(UTC)
        if isinstance(self.timing, crontab):
            start, delta, _ = self.timing.remaining_delta(now)
            return cast(datetime, start + delta).astimezone(UTC)
        interval: timedelta = self.timing.run_every
        return now + interval

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "job": self.job,
            "when": self.description,
            "payload": self.payload,
            "priority": self.priority,
            "tenant": self.tenant,
            "expires": self.expires,
            "builtin": self.builtin,
            "next_run": self.next_run(now).isoformat(),
        }


def parse_cron(line: str) -> Any:
    """A five-field cron line (``m h dom mon dow``, UTC) or a nickname as a Celery crontab."""
    text = CRON_NICKNAMES.get(line.strip().lower(), line)
    parts = text.split()
    if len(parts) != len(CRON_FIELDS):
        raise ValueError(
            "a cron line has five fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)} in {line!r}"
        )
    fields: dict[str, str] = {}
    for (label, key), part in zip(CRON_FIELDS, parts, strict=True):
        try:
            crontab(**{key: part})  # one field at a time, so that the error can name it
        except (ValueError, ParseException) as exc:
            raise ValueError(f"bad {label} field {part!r} in cron line {line!r}: {exc}") from None
        fields[key] = part
    return crontab(**fields)


def platform_jobs(settings: Settings) -> list[ScheduledJob]:
    """The platform's own periodic jobs (low priority; a run no worker took expires)."""
    cleanup, snapshot = settings.cleanup_interval, settings.stats_snapshot_interval
    return [
        ScheduledJob(
            name=CLEAN_HISTORY, job=CLEAN_HISTORY, timing=_every(cleanup),
            description=f"every {cleanup:g}s", priority=Priority.LOW.value, expires=cleanup,
            builtin=True,
        ),
        ScheduledJob(
            name=STATS_SNAPSHOT, job=STATS_SNAPSHOT, timing=_every(snapshot),
            description=f"every {snapshot:g}s", priority=Priority.LOW.value, expires=snapshot,
            builtin=True,
        ),
    ]  # fmt: skip


def scheduled_jobs(settings: Settings) -> list[ScheduledJob]:
    """Every periodic job: the platform's, then the user's; ConfigurationError on a bad one."""
    jobs, problems = _collect(settings)
    if problems:
        raise ConfigurationError("TASKS_SCHEDULES: " + "; ".join(problems))
    return jobs


def beat_jobs(settings: Settings) -> list[ScheduledJob]:
    """The periodic jobs that can be built, for the app's configuration; never raises.

    A bad entry is left out with a warning here, so that it does not stop workers or the API;
    beat itself refuses to start on it (:class:`PlatformScheduler`).
    """
    jobs, problems = _collect(settings)
    for problem in problems:
        logger.warning("TASKS_SCHEDULES: %s; beat will refuse to start", problem)
    return jobs


def _collect(settings: Settings) -> tuple[list[ScheduledJob], list[str]]:
    jobs = platform_jobs(settings)
    problems: list[str] = []
    for entry in settings.schedules:
        if entry.name in {job.name for job in jobs}:
            problems.append(f"schedule {entry.name!r} is named twice (or like a platform job)")
            continue
        try:
            jobs.append(_user_job(entry))
        except ValueError as exc:
            problems.append(f"schedule {entry.name!r}: {exc}")
    return jobs, problems


def _user_job(entry: ScheduleEntry) -> ScheduledJob:
    if entry.cron is not None:
        timing, description = parse_cron(entry.cron), f"cron {entry.cron.strip()}"
    else:
        assert entry.every is not None  # the settings require one of the two
        timing, description = _every(entry.every), f"every {entry.every:g}s"
    return ScheduledJob(name=entry.name, job=entry.job, timing=timing, description=description,
                        payload=dict(entry.payload), priority=entry.priority,
                        tenant=entry.tenant)  # fmt: skip


def _every(seconds: float) -> Any:
    return schedule(run_every=timedelta(seconds=seconds))


def check_jobs(app: PlatformCelery, jobs: list[ScheduledJob]) -> None:
    """ConfigurationError unless every job is declared and accepts its payload and options."""
    problems = [f"schedule {job.name!r}: {problem}" for job in jobs
                if (problem := _problem(app, job)) is not None]  # fmt: skip
    if problems:
        raise ConfigurationError("TASKS_SCHEDULES: " + "; ".join(problems))


def _problem(app: PlatformCelery, job: ScheduledJob) -> str | None:
    try:
        declared_task(app, job.job).validate_payload((), dict(job.payload))
    except (UnknownJob, InvalidPayload) as exc:
        return str(exc)
    if job.priority is not None:
        try:
            Priority.parse(job.priority)
        except ValueError as exc:
            return str(exc)
    try:
        check_tenant(job.tenant)
    except InvalidPayload as exc:
        return str(exc)
    return None


def effective_schedule(app: PlatformCelery) -> list[ScheduledJob]:
    """The schedule beat runs for ``app``, checked against the declared job types."""
    jobs = scheduled_jobs(app.settings)
    check_jobs(app, jobs)
    return jobs


def state_file(settings: Settings) -> str:
    """Where beat keeps when each entry last ran (under the data folder)."""
    return str(settings.data_dir.resolve() / STATE_FILE)


class PlatformScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, refusing to start on a schedule that cannot work."""

    def setup_schedule(self) -> None:
        app: PlatformCelery = self.app
        try:
            jobs = effective_schedule(app)
        except ConfigurationError as exc:
            # one clear line and exit code 1, rather than a traceback through beat's logging
            logger.critical("beat cannot start: %s", exc)
            raise SystemExit(1) from exc
        app.settings.data_dir.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            logger.info("beat: %s -> %s %s", job.name, job.job, job.description)
        super().setup_schedule()

    def install_default_entries(self, data: Any) -> None:
        """None: ``platform.clean_history`` also runs the result backend's clean-up."""
