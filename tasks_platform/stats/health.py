"""Is the platform healthy? Pure rules over a :class:`~tasks_platform.stats.snapshot.Snapshot`.

==========================================================  ========
rule (defaults of :class:`HealthThresholds`)                 level
==========================================================  ========
a non-empty work queue that no answering worker consumes     critical
the broker could not be read                                 critical
failed + dead jobs of one job type in the window > 10        warning
messages waiting in one work queue > 50                      warning
a dead-letter queue that is not empty (> 0)                  warning
wait p95 of one job type in the window > 60 s                warning
the history database could not be read                       warning
==========================================================  ========

The verdict's level is the worst of its alerts' (healthy without any); ``tasks-platform
health`` exits with :attr:`Level.exit_code` (0, 1, 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from tasks_platform.settings import Settings
from tasks_platform.stats.snapshot import Snapshot


class Level(StrEnum):
    """How bad things are."""

    HEALTHY = "healthy"  #: nothing to look at
    WARNING = "warning"  #: someone should look, nothing is stuck
    CRITICAL = "critical"  #: work is not getting done

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


_EXIT_CODES = {Level.HEALTHY: 0, Level.WARNING: 1, Level.CRITICAL: 2}


@dataclass(frozen=True)
class HealthThresholds:
    """The limits above which a figure raises an alert."""

    max_unsuccessful_jobs: int = 10  #: failed + dead jobs per job type in the window
    max_queue_depth: int = 50  #: messages waiting per work queue, all priorities
    max_dead_letters: int = 0  #: messages per dead-letter queue
    max_wait_p95_seconds: float = 60.0  #: p95 of the wait per job type in the window

    @classmethod
    def from_settings(cls, settings: Settings) -> HealthThresholds:
        """The limits configured with ``TASKS_HEALTH_*``."""
        return cls(
            max_unsuccessful_jobs=settings.health_max_unsuccessful_jobs,
            max_queue_depth=settings.health_max_queue_depth,
            max_dead_letters=settings.health_max_dead_letters,
            max_wait_p95_seconds=settings.health_max_wait_p95,
        )


@dataclass(frozen=True)
class Alert:
    """One figure over its limit: what it is about (``subject``), the figure and the limit."""

    level: Level
    rule: str
    subject: str
    value: float
    limit: float
    message: str


@dataclass(frozen=True)
class Verdict:
    level: Level
    alerts: tuple[Alert, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level.value, "alerts": [asdict(alert) for alert in self.alerts]}


def evaluate(snapshot: Snapshot, thresholds: HealthThresholds | None = None) -> Verdict:
    """The verdict on ``snapshot``: critical alerts first, then warnings."""
    limits = thresholds or HealthThresholds()
    alerts = [
        *_unavailable(snapshot),
        *_unconsumed_queues(snapshot),
        *_deep_queues(snapshot, limits),
        *_dead_letters(snapshot, limits),
        *_unsuccessful_jobs(snapshot, limits),
        *_slow_starts(snapshot, limits),
    ]
    alerts.sort(key=lambda alert: -alert.level.exit_code)
    level = max(
        (alert.level for alert in alerts), key=lambda lv: lv.exit_code, default=Level.HEALTHY
    )
    return Verdict(level=level, alerts=tuple(alerts))


def _unavailable(snapshot: Snapshot) -> Iterator[Alert]:
    for source, error in snapshot.unavailable.items():
        level = Level.CRITICAL if source == "broker" else Level.WARNING
        yield Alert(level, "unavailable", source, 1, 0, f"{source} could not be read: {error}")


def _unconsumed_queues(snapshot: Snapshot) -> Iterator[Alert]:
    for queue in snapshot.queues():
        depth = snapshot.depth(queue)
        if depth > 0 and not snapshot.consumers.get(queue):
            yield Alert(
                Level.CRITICAL,
                "unconsumed_queue",
                queue,
                depth,
                0,
                f"queue {queue}: {depth} message(s) waiting and no worker consumes it",
            )


def _deep_queues(snapshot: Snapshot, limits: HealthThresholds) -> Iterator[Alert]:
    for queue in snapshot.queues():
        depth = snapshot.depth(queue)
        if depth > limits.max_queue_depth:
            yield Alert(
                Level.WARNING,
                "queue_depth",
                queue,
                depth,
                limits.max_queue_depth,
                f"queue {queue}: {depth} message(s) waiting (limit {limits.max_queue_depth})",
            )


def _dead_letters(snapshot: Snapshot, limits: HealthThresholds) -> Iterator[Alert]:
    for queue, count in snapshot.dead_letters.items():
        if count > limits.max_dead_letters:
            yield Alert(
                Level.WARNING,
                "dead_letters",
                queue,
                count,
                limits.max_dead_letters,
                f"dead-letter queue {queue}.dead holds {count} message(s)",
            )


def _unsuccessful_jobs(snapshot: Snapshot, limits: HealthThresholds) -> Iterator[Alert]:
    if snapshot.window is None:
        return
    minutes = snapshot.window.seconds / 60
    for figures in snapshot.window.jobs:
        if figures.unsuccessful > limits.max_unsuccessful_jobs:
            yield Alert(
                Level.WARNING,
                "unsuccessful_jobs",
                figures.job,
                figures.unsuccessful,
                limits.max_unsuccessful_jobs,
                f"job {figures.job}: {figures.unsuccessful} failed or dead in the last "
                f"{minutes:g} min (limit {limits.max_unsuccessful_jobs})",
            )


def _slow_starts(snapshot: Snapshot, limits: HealthThresholds) -> Iterator[Alert]:
    if snapshot.window is None:
        return
    for figures in snapshot.window.jobs:
        p95 = figures.wait.p95
        if p95 is not None and p95 > limits.max_wait_p95_seconds:
            yield Alert(
                Level.WARNING,
                "wait_p95",
                figures.job,
                p95,
                limits.max_wait_p95_seconds,
                f"job {figures.job}: wait p95 {p95:.1f} s "
                f"(limit {limits.max_wait_p95_seconds:g} s)",
            )
