"""``tasks-platform schedules``: the schedule beat runs, checked, with the next run times."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

import tasks_platform
from tasks_platform.schedules import effective_schedule, state_file
from tasks_platform.table import format_table


@click.command("schedules")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def schedules_command(as_json: bool) -> None:
    """The periodic jobs beat sends (the platform's and TASKS_SCHEDULES), checked."""
    now = datetime.now(UTC)
    jobs = effective_schedule(tasks_platform.app)  # a ConfigurationError exits 2 with the reason
    if as_json:
        for job in jobs:
            click.echo(json.dumps(job.as_dict(now), default=str))
        return
    rows = [
        (job.name, job.job, job.description, job.priority or "-", job.tenant or "-",
         job.next_run(now).strftime("%Y-%m-%d %H:%M:%S"), _payload(job.payload))
        for job in jobs
    ]  # fmt: skip
    header = ("name", "job", "when", "priority", "tenant", "next run (UTC)", "payload")
    click.echo(format_table(header, rows))
    click.echo(
        f"{len(jobs)} periodic job(s); cron lines are in UTC; an 'every' entry first runs that "
        f"long after beat starts. Beat keeps its state in {state_file(tasks_platform.app.settings)}"
    )


def _payload(payload: dict[str, object], width: int = 60) -> str:
    text = json.dumps(payload, separators=(",", ":"), default=str) if payload else "-"
    return text if len(text) <= width else text[: width - 3] + "..."
