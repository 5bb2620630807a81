"""Snapshots and verdicts as aligned text tables, for people (``tasks-platform stats``)."""

from __future__ import annotations

from tasks_platform.stats.health import Verdict
from tasks_platform.stats.snapshot import JobFigures, Snapshot, WindowFigures
from tasks_platform.table import format_table

_JOB_HEADER = (
    "job", "finished", "per min", "succeeded", "failed", "dead", "retried", "success %",
    "wait p50 s", "wait p95 s", "run p50 s", "run p95 s", "run p99 s",
)  # fmt: skip


def format_snapshot(snapshot: Snapshot) -> str:
    """The queues table, the job types table and the workers, one block after the other."""
    blocks = []
    if "broker" not in snapshot.unavailable:
        blocks.append(format_queues(snapshot))
        workers = ", ".join(snapshot.workers) or "none answered"
        blocks.append(f"workers ({len(snapshot.workers)}): {workers}")
    if snapshot.window is not None:
        blocks.append(format_window(snapshot.window))
    blocks += [f"{source} unavailable: {error}" for source, error in snapshot.unavailable.items()]
    return "\n\n".join(blocks)


def format_queues(snapshot: Snapshot) -> str:
    """One row per work queue: waiting messages per priority, dead letters, consumers."""
    priorities = list(dict.fromkeys(depth.priority for depth in snapshot.depths))
    waiting = {(d.queue, d.priority): d.messages for d in snapshot.depths}
    rows = [
        (
            queue,
            *(waiting.get((queue, priority), 0) for priority in priorities),
            snapshot.depth(queue),
            snapshot.dead_letters.get(queue, "-"),
            len(snapshot.consumers.get(queue, ())),
        )
        for queue in snapshot.queues()
    ]
    header = ("queue", *priorities, "waiting", "dead letters", "consumers")
    if priorities == ["all"]:  # one total per queue: no need to print it twice
        header = ("queue", "waiting", "dead letters", "consumers")
        rows = [(row[0], *row[2:]) for row in rows]
    return format_table(header, rows)


def format_window(window: WindowFigures) -> str:
    """One row per job type over the window, with a total row."""
    since = window.since.strftime("%Y-%m-%d %H:%M:%S")
    until = window.until.strftime("%H:%M:%S")
    title = f"jobs from {since} to {until} UTC ({window.seconds / 60:.1f} min)"
    rows = [_job_row(figures) for figures in window.jobs]
    return title + "\n" + format_table(_JOB_HEADER, rows, footer=_job_row(window.total))


def format_by_queue(window: WindowFigures) -> str:
    """One row per queue (``window_figures(..., by=Job.queue)``), with a total row."""

    def row(f: JobFigures) -> tuple[object, ...]:
        return (f.job, f.queued, f.succeeded, f.retrying, f.dead,
                _number(f.wait.p50), _number(f.wait.p95), _number(f.run.p95))  # fmt: skip

    header = ("queue", "submitted", "succeeded", "retried", "dead-lettered", "wait p50 s",
              "wait p95 s", "run p95 s")  # fmt: skip
    return format_table(header, [row(f) for f in window.jobs], footer=row(window.total))


def _job_row(figures: JobFigures) -> tuple[object, ...]:
    return (
        figures.job,
        figures.finished,
        f"{figures.per_minute:.2f}",
        figures.succeeded,
        figures.failed,
        figures.dead,
        figures.retrying,
        _number(None if figures.success_rate is None else figures.success_rate * 100, 1),
        _number(figures.wait.p50),
        _number(figures.wait.p95),
        _number(figures.run.p50),
        _number(figures.run.p95),
        _number(figures.run.p99),
    )


def format_verdict(verdict: Verdict) -> str:
    """The level, then one line per alert, worst first."""
    if not verdict.alerts:
        return verdict.level.value
    rows = [(alert.level.value, alert.message) for alert in verdict.alerts]
    return f"{verdict.level.value}: {len(rows)} alert(s)\n" + format_table(("level", "alert"), rows)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
