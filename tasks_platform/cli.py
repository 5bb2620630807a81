"""The ``tasks-platform`` command."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

import tasks_platform
from tasks_platform.api.commands import api_command, token
from tasks_platform.audit import actor_from_environment
from tasks_platform.control import Control
from tasks_platform.deadletter import DeadLetters
from tasks_platform.demo import run_demo
from tasks_platform.errors import PlatformError
from tasks_platform.flower import DEFAULT_ADDRESS, DEFAULT_PORT, flower_command, run_flower
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import JobState
from tasks_platform.history.repository import MAX_LIMIT, JobRepository, as_utc, row_as_dict
from tasks_platform.history.workflows import find_workflow
from tasks_platform.reconcile_command import reconcile_command
from tasks_platform.relay_command import relay_command
from tasks_platform.schedule_command import schedules_command
from tasks_platform.stats import BROKER_ERRORS, Stats, exposition
from tasks_platform.stats.report import format_snapshot, format_verdict
from tasks_platform.stats.usage import MAX_DAYS as MAX_USAGE_DAYS
from tasks_platform.stats.usage import check_range, last_days
from tasks_platform.table import format_table

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_LONGEST_DURATION = timedelta(days=36_525)

if TYPE_CHECKING:  # click >= 8.2 types ParamType by the value it converts to
    _DurationType = click.ParamType[timedelta]
    _MomentType = click.ParamType[datetime]
else:
    _DurationType = _MomentType = click.ParamType


@click.group()
def main() -> None:
    """Operate tasks-platform: the demo, dead letters, job history, stats and health."""


@main.command()
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(0.05, 20),
              help="Multiply the number of jobs (1.0 = 300 jobs).")  # fmt: skip
@click.option("--timeout", default=240.0, show_default=True, type=click.FloatRange(10),
              help="Give up after this many seconds.")  # fmt: skip
def demo(scale: float, timeout: float) -> None:
    """Run a worker and a mixed workload through it; print a per-queue summary."""
    sys.exit(run_demo(scale=scale, timeout=timeout))


@main.group()
def dlq() -> None:
    """Dead letters: list, show, replay, purge."""


@dlq.command("list")
@click.argument("queue", required=False)
@click.option("--group", help="Only the dead letters of this group (see: dlq groups).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(queue: str | None, group: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, of one QUEUE or of all."""
    letters = _dead_letters().list(queue, group=group, limit=limit)
    if as_json:
        for letter in letters:
            click.echo(json.dumps(letter.as_dict(), default=str))
        return
    rows = [
        (letter.task_id or "-", letter.job or "-", letter.queue, letter.reason,
         letter.attempts, _when(letter.dead_at), _short(letter.exception_type,
                                                        letter.exception_message))
        for letter in letters
    ]  # fmt: skip
    header = ("task id", "job", "queue", "reason", "attempts", "dead at", "error")
    click.echo(format_table(header, rows))
    click.echo(f"{len(letters)} dead letter(s)")


@dlq.command("show")
@click.argument("task_id")
def dlq_show(task_id: str) -> None:
    """Show one dead letter, with its payload and traceback."""
    letter = _dead_letters().show(task_id)
    click.echo(json.dumps(letter.as_dict(), indent=2, default=str))


@dlq.command("groups")
@click.argument("queue", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_groups(queue: str | None, as_json: bool) -> None:
    """Dead letters grouped by error: job type, exception type and normalised message."""
    groups = _dead_letters().groups(queue)
    if as_json:
        for group in groups:
            click.echo(json.dumps(group.as_dict()))
        return
    rows = [
        (g.fingerprint, g.name or "-", g.exc_type or "-", ",".join(g.queues), g.count,
         _when(g.first_at), _when(g.last_at), _short(g.message, "", width=70))
        for g in groups
    ]  # fmt: skip
    header = ("group", "job", "exception", "queues", "jobs", "first dead", "last dead", "message")
    click.echo(format_table(header, rows))
    click.echo(f"{len(groups)} group(s), {sum(g.count for g in groups)} job(s)")


_REASON_HELP = "Why: kept in the audit log with who did it."


@dlq.command("replay")
@click.argument("task_id", required=False)
@click.option("--queue", help="Replay every dead letter of this queue.")
@click.option("--group", help="Replay every dead letter of this group (see: dlq groups).")
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
@click.option("--reason", help=_REASON_HELP)
def dlq_replay(task_id: str | None, queue: str | None, group: str | None, everything: bool,
               reason: str | None) -> None:  # fmt: skip
    """Send dead letters back to their work queue, attempts reset."""
    _one_target(task_id, queue, group, everything)
    actor = actor_from_environment(tasks_platform.app.settings)
    with _database_errors():
        ids = _dead_letters().replay(task_id=task_id, queue=queue, group=group, actor=actor,
                                     reason=reason)  # fmt: skip
    click.echo(f"replayed {len(ids)} job(s)")


@dlq.command("purge")
@click.argument("task_id", required=False)
@click.option("--queue", help="Purge every dead letter of this queue.")
@click.option("--group", help="Purge every dead letter of this group (see: dlq groups).")
@click.option("--all", "everything", is_flag=True, help="Purge every dead letter.")
@click.option("--reason", help=_REASON_HELP)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(task_id: str | None, queue: str | None, group: str | None, everything: bool,
              reason: str | None, yes: bool) -> None:  # fmt: skip
    """Delete dead letters for good."""
    _one_target(task_id, queue, group, everything)
    if not yes and task_id is None:
        what = f"group {group}" if group else queue or "every queue"
        click.confirm(f"Delete every dead letter of {what}?", abort=True)
    actor = actor_from_environment(tasks_platform.app.settings)
    with _database_errors():
        removed = _dead_letters().purge(task_id=task_id, queue=queue, group=group, actor=actor,
                                        reason=reason)  # fmt: skip
    click.echo(f"purged {removed} message(s)")


# -- history, stats and health ---------------------------------------------------------------
def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h30m``, ``7d`` ... as a positive timedelta; else click.BadParameter."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or _DURATION.sub("", compact):
        raise click.BadParameter(f"{text!r} is not a duration such as 90s, 30m, 1h30m or 7d")
    try:
        total = sum(
            (timedelta(**{_UNITS[u]: float(n)}) for n, u in _DURATION.findall(compact)),
            timedelta(),
        )
    except OverflowError:
        total = _LONGEST_DURATION * 2
    if not timedelta(0) < total <= _LONGEST_DURATION:
        raise click.BadParameter(f"{text!r} is not a duration between 1s and 100 years")
    return total


class Duration(_DurationType):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


class Moment(_MomentType):
    """A moment: a duration ago (``1h``) or an ISO 8601 date/time (UTC unless it says)."""

    name = "duration|datetime"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return as_utc(value)
        try:
            return datetime.now(UTC) - parse_duration(str(value))
        except click.BadParameter:
            pass
        try:
            return as_utc(datetime.fromisoformat(str(value)))
        except ValueError:
            self.fail(f"{value!r} is neither a duration (30m, 7d) nor an ISO 8601 time", param, ctx)


@main.group()
def db() -> None:
    """The history database."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the history tables to this release's schema."""
    from tasks_platform.history.migrations import upgrade  # noqa: PLC0415 - loads alembic

    settings = tasks_platform.app.settings
    upgrade(settings)
    url = make_url(settings.effective_database_url).render_as_string(hide_password=True)
    click.echo(f"history database {url} is up to date")


@main.command("jobs")
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in JobState]),
              help="Only jobs in this state (repeatable).")  # fmt: skip
@click.option("--queue", help="Only jobs of this work queue.")
@click.option("--job", "name", help="Only jobs of this job type.")
@click.option("--tenant", help="Only jobs of this tenant.")
@click.option("--since", type=Moment(), help="Queued at or after: 1h, 30m, 7d or ISO time.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, MAX_LIMIT))
@click.option("--after", help="The cursor printed at the end of the previous page.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: items, next_cursor.")
def jobs(states: tuple[str, ...], as_json: bool, **filters: Any) -> None:
    """List jobs from the history, newest first."""
    with _history() as session:
        page = JobRepository(session).list(states=states or None, **filters)
        items = [row_as_dict(job) for job in page.items]
    if as_json:
        click.echo(json.dumps({"items": items, "next_cursor": page.next_cursor}, default=str))
        return
    header = ("id", "job", "queue", "priority", "state", "attempts", "queued at", "wait s",
              "run s", "error")  # fmt: skip
    rows = [
        (i["id"], i["name"] or "-", i["queue"] or "-", i["priority"] or "-", i["state"],
         i["attempts"], _iso(i["queued_at"]), _seconds(i["wait_seconds"]),
         _seconds(i["run_seconds"]), _short(i["error_type"] or "", i["error_message"] or ""))
        for i in items
    ]  # fmt: skip
    click.echo(format_table(header, rows))
    click.echo(f"{len(items)} job(s)")
    if page.next_cursor:
        click.echo(f"more: --after {page.next_cursor}")


@main.command("job")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="The job and its events as JSON.")
def job_show(job_id: str, as_json: bool) -> None:
    """Show one job from the history, with every transition it went through."""
    with _history() as session:
        found = JobRepository(session).get(job_id)
        if found is None:
            raise click.ClickException(f"no job with id {job_id!r} in the history")
        job, events = row_as_dict(found[0]), [row_as_dict(event) for event in found[1]]
    if as_json:
        click.echo(json.dumps({"job": job, "events": events}, default=str))
        return
    fields = [(key, _cell(value)) for key, value in job.items()
              if value is not None and key != "error_traceback"]  # fmt: skip
    click.echo(format_table(("field", "value"), fields))
    if job["percent"] is not None:
        note = f" - {job['progress_note']}" if job["progress_note"] else ""
        click.echo(f"\nprogress: {job['percent']:.1f}% (attempt {job['attempts']}){note}")
    if job["error_traceback"]:
        click.echo("\n" + job["error_traceback"].rstrip())
    rows = [(_iso(e["at"]), e["state"], e["attempt"], e["worker"] or "-", _cell(e["detail"]))
            for e in events]  # fmt: skip
    click.echo("\n" + format_table(("at", "state", "attempt", "worker", "detail"), rows))


@main.command("workflow")
@click.argument("root_id")
@click.option("--json", "as_json", is_flag=True, help="The workflow and its steps as JSON.")
def workflow_show(root_id: str, as_json: bool) -> None:
    """Show a workflow (chain, group, chord) by its root id: its state, steps and failures."""
    with _history() as session:
        found = find_workflow(session, root_id)
        if found is None:
            raise click.ClickException(f"no workflow with root id {root_id!r} in the history")
        view = found.as_dict()
    if as_json:
        click.echo(json.dumps(view, default=str))
        return
    click.echo(f"workflow {root_id}: {view['state']}, {view['step_count']} step(s)")
    rows = [(n, s["id"], s["name"] or "-", s["state"], s["attempts"], _iso(s["queued_at"]),
             _seconds(s["run_seconds"]), _short(s["error_type"] or "", s["error_message"] or ""))
            for n, s in enumerate(view["steps"], start=1)]  # fmt: skip
    header = ("#", "id", "job", "state", "attempts", "queued at", "run s", "error")
    click.echo(format_table(header, rows))
    if view["truncated"]:
        click.echo(f"(the first {len(rows)} steps)")
    for step in view["failing"]:
        error = _short(step["error_type"] or "", step["error_message"] or "", width=200)
        click.echo(f"failed at {step['name']} {step['id']} ({step['state']}): {error or '-'}")


@main.command("stats")
@click.option("--window", default="15m", show_default=True, type=Duration(),
              help="How far back the job figures look.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The figures and the verdict as JSON.")
@click.option("--prometheus", is_flag=True, help="Prometheus text exposition (format 0.0.4).")
def stats(window: timedelta, as_json: bool, prometheus: bool) -> None:
    """Queue depths, dead letters, workers, and job figures over a recent window."""
    if as_json and prometheus:
        raise click.UsageError("--json and --prometheus exclude each other")
    with _stats() as figures:
        snapshot = figures.snapshot(window=window)
        verdict = figures.verdict(snapshot)
    if prometheus:
        click.echo(exposition(snapshot, verdict), nl=False)
    elif as_json:
        click.echo(json.dumps(snapshot.as_dict() | {"health": verdict.as_dict()}, default=str))
    else:
        click.echo(format_snapshot(snapshot))
        click.echo(f"\nhealth: {verdict.level.value}")


@main.command("usage")
@click.option("--tenant", help="Only this tenant's jobs.")
@click.option("--job", "name", help="Only jobs of this job type.")
@click.option("--days", type=click.IntRange(1, MAX_USAGE_DAYS),
              help="The last N UTC days, today included (default 7).")  # fmt: skip
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), help="First UTC day (YYYY-MM-DD).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), help="Last UTC day (YYYY-MM-DD).")
@click.option("--json", "as_json", is_flag=True, help="The rows as JSON.")
def usage(tenant: str | None, name: str | None, days: int | None, since: datetime | None,
          until: datetime | None, as_json: bool) -> None:  # fmt: skip
    """Usage per day, tenant and job type: jobs ended, attempts, run time, LLM tokens."""
    if days is not None and (since or until):
        raise click.UsageError("--days and --since/--until exclude each other")
    first, last = last_days(days or 7)
    first, last = since.date() if since else first, until.date() if until else last
    try:
        check_range(first, last)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with _stats() as figures, _database_errors():
        rows = figures.usage(since=first, until=last, tenant=tenant, job=name)
    if as_json:
        click.echo(json.dumps({"since": first.isoformat(), "until": last.isoformat(),
                               "rows": [row.as_dict() for row in rows]}))  # fmt: skip
        return
    header = ("day", "tenant", "job", "jobs", "succeeded", "failed", "cancelled", "attempts",
              "run s", "prompt tokens", "completion tokens")  # fmt: skip
    table = [(r.day.isoformat(), r.tenant or "-", r.job, r.jobs, r.succeeded, r.failed,
              r.cancelled, r.attempts, f"{r.run_seconds:.3f}", r.prompt_tokens,
              r.completion_tokens) for r in rows]  # fmt: skip
    footer = None
    if rows:
        summed = ("jobs", "succeeded", "failed", "cancelled", "attempts", "run_seconds",
                  "prompt_tokens", "completion_tokens")  # fmt: skip
        sums = [sum(getattr(r, f) for r in rows) for f in summed]
        sums[5] = f"{sums[5]:.3f}"
        footer = ("total", "", "", *sums)
    click.echo(format_table(header, table, footer=footer))
    click.echo(f"{len(rows)} row(s), {first.isoformat()} to {last.isoformat()} (UTC days)")


@main.command("health")
@click.option("--window", default="15m", show_default=True, type=Duration(),
              help="How far back the job figures look.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The verdict as JSON.")
def health(window: timedelta, as_json: bool) -> None:
    """Check the platform; exit 0 when healthy, 1 on warnings, 2 when critical."""
    with _stats() as figures:
        verdict = figures.health(window=window)
    click.echo(json.dumps(verdict.as_dict()) if as_json else format_verdict(verdict))
    sys.exit(verdict.level.exit_code)


@main.command("clean")
@click.option("--older-than", "older_than", required=True, type=Duration(),
              help="Delete jobs that ended longer ago than this (7d, 12h ...).")  # fmt: skip
def clean(older_than: timedelta) -> None:
    """Delete old jobs (and their events) from the history; audited."""
    cutoff = datetime.now(UTC) - older_than
    with _control() as control:
        deleted = control.clean(older_than, actor=_actor())
    click.echo(f"deleted {deleted} job(s) that ended before {cutoff:%Y-%m-%d %H:%M:%S} UTC")


# -- control: cancel, retry, pause, resume ---------------------------------------------------
@main.command("cancel")
@click.argument("job_id")
@click.option("--reason", help=_REASON_HELP)
def cancel(job_id: str, reason: str | None) -> None:
    """Cancel a job: a waiting one never runs, a running one is stopped."""
    with _control() as control:
        outcome = control.cancel(job_id, actor=_actor(), reason=reason)
    if outcome == "cancelled":
        click.echo(f"cancelled {job_id}: it will not run, even on workers started later")
    else:
        click.echo(f"cancelled {job_id}: it is running and is being stopped")


@main.command("retry")
@click.argument("job_id")
@click.option("--reason", help=_REASON_HELP)
def retry(job_id: str, reason: str | None) -> None:
    """Run a failed, dead or cancelled job again, as a new job linked to it."""
    with _control() as control:
        new_id = control.retry(job_id, actor=_actor(), reason=reason)
    click.echo(f"retrying {job_id} as new job {new_id}")


@main.command("pause")
@click.argument("queue")
@click.option("--reason", help=_REASON_HELP)
def pause(queue: str, reason: str | None) -> None:
    """Stop every worker consuming QUEUE (also workers started later); jobs still queue up."""
    with _control() as control:
        control.pause(queue, actor=_actor(), reason=reason)
    click.echo(f"paused {queue}: jobs wait in it until: tasks-platform resume {queue}")


@main.command("resume")
@click.argument("queue")
@click.option("--reason", help=_REASON_HELP)
def resume(queue: str, reason: str | None) -> None:
    """Let the workers consume a paused QUEUE again."""
    with _control() as control:
        control.resume(queue, actor=_actor(), reason=reason)
    click.echo(f"resumed {queue}")


@main.command("queues")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def queues(as_json: bool) -> None:
    """The work queues: jobs waiting in each, and which are paused, since when, by whom, why."""
    with _control() as control:
        try:
            states = control.queues()
        except BROKER_ERRORS as exc:
            raise click.ClickException(f"broker: {exc}") from exc
    if as_json:
        for state in states:
            click.echo(json.dumps(state.as_dict(), default=str))
        return
    rows = [
        (q.name, q.depth, "paused" if q.pause else "-",
         _iso(as_utc(q.pause.paused_at).isoformat()) if q.pause else "-",
         q.pause.actor if q.pause else "-", (q.pause.reason or "-") if q.pause else "-")
        for q in states
    ]  # fmt: skip
    click.echo(format_table(("queue", "waiting", "state", "paused at", "by", "reason"), rows))


@main.command("flower")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")  # fmt: skip
@click.option("--url-prefix", default="", help="Serve under this path, e.g. behind a proxy.")
@click.option("--insecure-dev", is_flag=True,
              help="Local development only: start without credentials, on loopback.")  # fmt: skip
def flower(port: int, address: str, url_prefix: str, insecure_dev: bool) -> None:
    """Start Flower on the configured broker, with basic auth from TASKS_FLOWER_*."""
    command = flower_command(tasks_platform.app.settings, port=port, address=address,
                             url_prefix=url_prefix, insecure_dev=insecure_dev)  # fmt: skip
    for note in command.notes:
        click.echo(f"note: {note}", err=True)
    auth = "basic auth" if command.authenticated else "NO authentication"
    click.echo(f"starting Flower on {command.url} ({auth})", err=True)
    run_flower(command)


main.add_command(api_command)
main.add_command(token)
main.add_command(schedules_command)
main.add_command(relay_command)
main.add_command(reconcile_command)


@contextmanager
def _history() -> Iterator[Session]:
    """A session on the history database; its errors become one clear line."""
    engine = create_history_engine(tasks_platform.app.settings)
    try:
        with _database_errors(), session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


@contextmanager
def _database_errors() -> Iterator[None]:
    """Errors of the history database become one clear line."""
    try:
        yield
    except SQLAlchemyError as exc:
        text = " ".join(str(getattr(exc, "orig", None) or exc).split())
        hint = ""
        if "no such table" in text or "does not exist" in text:
            hint = " (not migrated? run: tasks-platform db upgrade)"
        raise click.ClickException(f"history database: {text[:300]}{hint}") from exc


@contextmanager
def _control() -> Iterator[Control]:
    engine = create_history_engine(tasks_platform.app.settings)
    try:
        with _database_errors():
            yield Control(tasks_platform.app, session_factory(engine))
    finally:
        engine.dispose()


def _actor() -> str:
    return actor_from_environment(tasks_platform.app.settings)


@contextmanager
def _stats() -> Iterator[Stats]:
    engine = create_history_engine(tasks_platform.app.settings)
    try:
        yield Stats(tasks_platform.app, session_factory(engine))
    finally:
        engine.dispose()


def _iso(value: str | None) -> str:
    return "-" if value is None else value[:19].replace("T", " ")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return _short(text, "", width=100)


def _dead_letters() -> DeadLetters:
    return DeadLetters(tasks_platform.app)


def _one_target(
    task_id: str | None, queue: str | None, group: str | None, everything: bool
) -> None:
    if sum((task_id is not None, queue is not None, group is not None, everything)) != 1:
        raise click.UsageError(
            "name exactly one of: a TASK_ID, --queue QUEUE, --group GROUP, --all"
        )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(float(timestamp), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(exc_type: str, message: str, width: int = 60) -> str:
    text = f"{exc_type}: {message}" if message else exc_type
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run() -> None:
    """Entry point that turns platform errors into one clear line and exit code 2."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PlatformError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
