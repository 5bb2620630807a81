"""The figures of one look at the platform, as plain frozen data (no I/O here).

A :class:`Snapshot` holds what the broker said (queue depths per priority, dead letters,
which worker consumes which queue) and what the history says about a recent window (per job
type: outcomes, throughput, wait and run quantiles). The health rules and the Prometheus
exposition are pure functions of it, so they are tested without any server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

#: the priority reported where the broker cannot tell the priorities apart
ALL_PRIORITIES = "all"
QUANTILES: tuple[float, ...] = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class QueueDepth:
    """Messages waiting in one work queue (a family), at one priority or ``all``."""

    queue: str
    priority: str
    messages: int


@dataclass(frozen=True)
class Quantiles:
    """p50/p95/p99 of a sample (None when it is empty), its size and its sum."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    count: int = 0
    total: float = 0.0

    def by_quantile(self) -> dict[float, float | None]:
        return {0.5: self.p50, 0.95: self.p95, 0.99: self.p99}


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of a sorted, non-empty sample, interpolated linearly between ranks."""
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def quantiles(values: Iterable[float]) -> Quantiles:
    ordered = sorted(values)
    if not ordered:
        return Quantiles()
    p50, p95, p99 = (quantile(ordered, q) for q in QUANTILES)
    return Quantiles(p50=p50, p95=p95, p99=p99, count=len(ordered), total=math.fsum(ordered))


@dataclass(frozen=True)
class JobFigures:
    """What one job type (or ``total``) did during the window.

    ``queued``, ``succeeded``, ``failed``, ``dead`` and ``retrying`` count transitions recorded
    in the window (``queued``: submissions and replays); ``unsuccessful`` counts the distinct
    jobs that failed or died in it (a job that fails and is then dead-lettered counts once);
    ``finished`` counts the jobs that finished in it, and ``per_minute`` is that over the
    window's minutes.
    """

    job: str
    queued: int = 0
    finished: int = 0
    per_minute: float = 0.0
    succeeded: int = 0
    failed: int = 0
    dead: int = 0
    retrying: int = 0
    unsuccessful: int = 0
    wait: Quantiles = field(default_factory=Quantiles)
    run: Quantiles = field(default_factory=Quantiles)

    @property
    def _outcomes(self) -> int:
        return self.succeeded + self.unsuccessful

    @property
    def success_rate(self) -> float | None:
        """Share of the jobs that ended in the window which succeeded."""
        return self.succeeded / self._outcomes if self._outcomes else None

    @property
    def failure_rate(self) -> float | None:
        return self.unsuccessful / self._outcomes if self._outcomes else None

    @property
    def retry_rate(self) -> float | None:
        """Share of the attempts that ended in the window which were retried."""
        attempts = self._outcomes + self.retrying
        return self.retrying / attempts if attempts else None

    def as_dict(self) -> dict[str, Any]:
        figures = asdict(self)
        figures.update(
            success_rate=self.success_rate,
            failure_rate=self.failure_rate,
            retry_rate=self.retry_rate,
        )
        return figures


@dataclass(frozen=True)
class WindowFigures:
    """The history of ``[since, until]``: per job type (sorted by name), and all together."""

    since: datetime
    until: datetime
    jobs: tuple[JobFigures, ...] = ()
    total: JobFigures = field(default_factory=lambda: JobFigures(job="total"))

    @property
    def seconds(self) -> float:
        return (self.until - self.since).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "seconds": self.seconds,
            "jobs": [figures.as_dict() for figures in self.jobs],
            "total": self.total.as_dict(),
        }


@dataclass(frozen=True)
class Snapshot:
    """One look at the platform. A source that could not be read is named in ``unavailable``.

    ``consumers`` maps each work queue (family) to the workers consuming it; ``workers`` lists
    every worker that answered.
    """

    taken_at: datetime
    depths: tuple[QueueDepth, ...] = ()
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    consumers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    workers: tuple[str, ...] = ()
    window: WindowFigures | None = None
    unavailable: Mapping[str, str] = field(default_factory=dict)

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue``, every priority together."""
        return sum(d.messages for d in self.depths if d.queue == queue)

    def queues(self) -> list[str]:
        """The work queues with a known depth, in the order first reported."""
        return list(dict.fromkeys(d.queue for d in self.depths))

    def as_dict(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at.isoformat(),
            "queues": {
                queue: {
                    "depth": self.depth(queue),
                    "by_priority": {
                        d.priority: d.messages for d in self.depths if d.queue == queue
                    },
                    "consumers": list(self.consumers.get(queue, ())),
                }
                for queue in self.queues()
            },
            "dead_letters": dict(self.dead_letters),
            "workers": list(self.workers),
            "window": None if self.window is None else self.window.as_dict(),
            "unavailable": dict(self.unavailable),
        }
