"""The figures of a snapshot in Prometheus' text exposition format (version 0.0.4).

Hand-rolled (no client library): every figure is a gauge of the moment it was taken, except
the wait and run times, which are summaries over the window (quantiles, ``_sum``, ``_count``).
Series that a source could not provide are left out, and ``tasks_source_up`` says which.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tasks_platform.stats.health import Verdict
from tasks_platform.stats.snapshot import Quantiles, Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SOURCES = ("broker", "history")

Labels = Mapping[str, str]


@dataclass(frozen=True)
class Sample:
    labels: Labels
    value: float
    suffix: str = ""


def escape_label_value(value: str) -> str:
    """A label value as the format wants it between double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def metric(name: str, kind: str, help_text: str, samples: list[Sample]) -> str:
    """One metric family: its HELP and TYPE lines and its samples."""
    lines = [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]
    for sample in samples:
        labels = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sample.labels.items())
        series = f"{name}{sample.suffix}{{{labels}}}" if labels else f"{name}{sample.suffix}"
        lines.append(f"{series} {format_value(sample.value)}")
    return "\n".join(lines) + "\n"


def exposition(snapshot: Snapshot, verdict: Verdict) -> str:
    """The whole exposition of ``snapshot`` and its ``verdict``."""
    parts = [*_broker_metrics(snapshot), *_window_metrics(snapshot)]
    parts.append(
        metric(
            "tasks_health_level",
            "gauge",
            "Health verdict: 0 healthy, 1 warning, 2 critical.",
            [Sample({}, verdict.level.exit_code)],
        )
    )
    parts.append(
        metric(
            "tasks_source_up",
            "gauge",
            "1 if the figures of this source were read.",
            [
                Sample({"source": source}, 0 if source in snapshot.unavailable else 1)
                for source in SOURCES
            ],
        )
    )
    return "".join(parts)


def _broker_metrics(snapshot: Snapshot) -> Iterator[str]:
    if "broker" in snapshot.unavailable:
        return
    yield metric(
        "tasks_queue_depth",
        "gauge",
        "Messages waiting in a work queue, per priority ('all' if not separable).",
        [Sample({"queue": d.queue, "priority": d.priority}, d.messages) for d in snapshot.depths],
    )
    yield metric(
        "tasks_queue_consumers",
        "gauge",
        "Workers consuming a work queue.",
        [Sample({"queue": q}, len(snapshot.consumers.get(q, ()))) for q in snapshot.queues()],
    )
    yield metric(
        "tasks_dead_letters",
        "gauge",
        "Messages in a dead-letter queue.",
        [Sample({"queue": q}, n) for q, n in snapshot.dead_letters.items()],
    )
    yield metric(
        "tasks_workers_active",
        "gauge",
        "Workers that answered an inspection.",
        [Sample({}, len(snapshot.workers))],
    )


def _window_metrics(snapshot: Snapshot) -> Iterator[str]:
    window = snapshot.window
    if window is None:
        return
    yield metric(
        "tasks_window_seconds",
        "gauge",
        "Length of the window of the job figures.",
        [Sample({}, window.seconds)],
    )
    outcomes = [
        Sample({"job": f.job, "state": state}, count)
        for f in window.jobs
        for state, count in (
            ("succeeded", f.succeeded),
            ("failed", f.failed),
            ("dead", f.dead),
            ("retrying", f.retrying),
        )
    ]
    yield metric(
        "tasks_jobs_window",
        "gauge",
        "Transitions of a job type to a state during the window.",
        outcomes,
    )
    yield metric(
        "tasks_jobs_finished_per_minute",
        "gauge",
        "Jobs of a type finished per minute over the window.",
        [Sample({"job": f.job}, f.per_minute) for f in window.jobs],
    )
    yield _summary("tasks_wait_seconds", "Seconds jobs waited in their queue.", window.total.wait)
    yield _summary("tasks_run_seconds", "Seconds jobs ran.", window.total.run)


def _summary(name: str, help_text: str, figures: Quantiles) -> str:
    samples = [
        Sample({"quantile": str(q)}, math.nan if value is None else value)
        for q, value in figures.by_quantile().items()
    ]
    samples += [Sample({}, figures.total, "_sum"), Sample({}, figures.count, "_count")]
    return metric(name, "summary", f"{help_text} Quantiles over the window.", samples)
