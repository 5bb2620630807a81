"""``tasks-platform reconcile``: jobs the history says are open but no broker or worker holds.

Reports by default (exit 1 if any job is lost, 0 if none); ``--fix`` queues the lost jobs
again (same id, payload from the history) and writes one audit entry. See
:mod:`tasks_platform.reconcile` for how a job is judged.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import click

import tasks_platform
from tasks_platform.audit import actor_from_environment
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.holdings import DEFAULT_INSPECT_TIMEOUT, DEFAULT_MAX_SCAN
from tasks_platform.reconcile import CONFIRM_DELAY, DEFAULT_LIMIT, Reconciler, Report, Verdict
from tasks_platform.stats import BROKER_ERRORS
from tasks_platform.table import format_table


class _BrokerUnavailable(click.ClickException):
    exit_code = 2


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    from tasks_platform.cli import parse_duration  # noqa: PLC0415 - cli imports this module

    return parse_duration(value)


@click.command("reconcile")
@click.option("--older-than", "older_than", default="5m", show_default=True, callback=_duration,
              help="Judge only jobs whose history has not moved for this long.")  # fmt: skip
@click.option("--fix", is_flag=True, help="Queue the lost jobs again (same id); audited.")
@click.option("--reason", help="Why (with --fix): kept in the audit log with who did it.")
@click.option("--limit", default=DEFAULT_LIMIT, show_default=True, type=click.IntRange(1, 100_000),
              help="Judge at most this many jobs (the longest idle first).")  # fmt: skip
@click.option("--max-scan", default=DEFAULT_MAX_SCAN, show_default=True, type=click.IntRange(1),
              help="Messages read per queue at most; a deeper queue is not judged.")  # fmt: skip
@click.option("--inspect-timeout", default=DEFAULT_INSPECT_TIMEOUT, show_default=True,
              type=click.FloatRange(0.1, 60), help="Seconds workers have to answer.")  # fmt: skip
@click.option("--confirm-delay", default=CONFIRM_DELAY, show_default=True,
              type=click.FloatRange(0, 60),
              help="Seconds before looking again for the jobs not found.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON document.")
def reconcile_command(older_than: timedelta, fix: bool, reason: str | None, limit: int,
                      max_scan: int, inspect_timeout: float, confirm_delay: float,
                      as_json: bool) -> None:  # fmt: skip
    """Find jobs queued/started in the history that no broker queue nor worker holds (lost).

    Exit 0: nothing lost (or, with --fix, every lost job queued again); 1: lost jobs remain.
    """
    app = tasks_platform.app
    engine = create_history_engine(app.settings)
    try:
        reconciler = Reconciler(app, session_factory(engine), max_scan=max_scan,
                                inspect_timeout=inspect_timeout,
                                confirm_delay=confirm_delay)  # fmt: skip
        actor = actor_from_environment(app.settings)
        report = reconciler.run(older_than=older_than, fix=fix, actor=actor, reason=reason,
                                limit=limit)  # fmt: skip
    except BROKER_ERRORS as exc:
        raise _BrokerUnavailable(f"broker: {exc.__class__.__name__}: {exc}") from exc
    finally:
        engine.dispose()
    click.echo(json.dumps(report.as_dict()) if as_json else _text(report))
    sys.exit(1 if report.unresolved else 0)


def _text(report: Report) -> str:
    lines = []
    if report.findings:
        rows = [(f.id, f.name or "-", f.queue or "-", f.state, f"{f.idle_seconds:.0f}",
                 f.verdict.value, f.reason or "-") for f in report.findings]  # fmt: skip
        header = ("id", "job", "queue", "state", "idle s", "verdict", "why")
        lines.append(format_table(header, rows))
    for family, why in sorted(report.blind.items()):
        lines.append(f"not judged: queue {family}: {why}")
    lost = report.count(Verdict.LOST)
    lines.append(
        f"{report.checked} open job(s) idle for {report.older_than:.0f}s or more: "
        f"{report.held} held by the broker or a worker, "
        f"{lost + report.count(Verdict.UNRECOVERABLE)} lost "
        f"({report.count(Verdict.UNRECOVERABLE)} unrecoverable), "
        f"{report.count(Verdict.UNKNOWN)} unknown; "
        f"{len(report.workers)} worker(s) answered"
    )
    if report.fixed:
        lines.append(f"queued again: {report.count(Verdict.REQUEUED)}, skipped (moved "
                     f"meanwhile): {report.count(Verdict.SKIPPED)}, failed: "
                     f"{report.count(Verdict.FAILED)}")  # fmt: skip
    elif lost:
        lines.append("run again with --fix to queue the lost jobs again")
    return "\n".join(lines)
