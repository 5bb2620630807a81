"""The ``tasks-platform`` command."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click

import tasks_platform
from tasks_platform.deadletter import DeadLetters
from tasks_platform.demo import run_demo
from tasks_platform.errors import PlatformError
from tasks_platform.table import format_table


@click.group()
def main() -> None:
    """Operate tasks-platform: run the demo, inspect and replay dead letters."""


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
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(queue: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, of one QUEUE or of all."""
    letters = _dead_letters().list(queue, limit=limit)
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


@dlq.command("replay")
@click.argument("task_id", required=False)
@click.option("--queue", help="Replay every dead letter of this queue.")
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
def dlq_replay(task_id: str | None, queue: str | None, everything: bool) -> None:
    """Send dead letters back to their work queue, attempts reset."""
    _one_target(task_id, queue, everything)
    ids = _dead_letters().replay(task_id=task_id, queue=queue)
    click.echo(f"replayed {len(ids)} job(s)")


@dlq.command("purge")
@click.argument("task_id", required=False)
@click.option("--queue", help="Purge every dead letter of this queue.")
@click.option("--all", "everything", is_flag=True, help="Purge every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(task_id: str | None, queue: str | None, everything: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    _one_target(task_id, queue, everything)
    if not yes and task_id is None:
        click.confirm(f"Delete every dead letter of {queue or 'every queue'}?", abort=True)
    removed = _dead_letters().purge(task_id=task_id, queue=queue)
    click.echo(f"purged {removed} message(s)")


def _dead_letters() -> DeadLetters:
    return DeadLetters(tasks_platform.app)


def _one_target(task_id: str | None, queue: str | None, everything: bool) -> None:
    if sum((task_id is not None, queue is not None, everything)) != 1:
        raise click.UsageError("name exactly one of: a TASK_ID, --queue QUEUE, --all")


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
