"""Operational figures: live queue depths, dead letters, workers, recent history, health.

::

    stats = Stats(app, session_factory(create_history_engine(app.settings)))
    snapshot = stats.snapshot(window=timedelta(minutes=15))
    verdict = stats.verdict(snapshot)       # or stats.health()
    text = exposition(snapshot, verdict)    # or stats.prometheus()

A source that cannot be read (broker down, history database unreachable or not migrated) is
logged and named in ``Snapshot.unavailable``; the health rules turn that into an alert rather
than failing the whole look.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from amqp.exceptions import AMQPError
from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from tasks_platform.deadletter import DeadLetters
from tasks_platform.stats.broker import queue_consumers, queue_depths
from tasks_platform.stats.health import Alert, HealthThresholds, Level, Verdict, evaluate
from tasks_platform.stats.history import window_figures
from tasks_platform.stats.prometheus import CONTENT_TYPE, exposition
from tasks_platform.stats.snapshot import (
    JobFigures,
    Quantiles,
    QueueDepth,
    Snapshot,
    WindowFigures,
)
from tasks_platform.stats.usage import UsageRow, usage_rows

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

log = logging.getLogger(__name__)

DEFAULT_WINDOW = timedelta(minutes=15)
#: what a broker that cannot be read raises (kombu wraps most, not all, transport errors)
BROKER_ERRORS: tuple[type[BaseException], ...] = (OSError, KombuError, RedisError, AMQPError)

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_WINDOW",
    "Alert",
    "BrokerFigures",
    "HealthThresholds",
    "JobFigures",
    "Level",
    "Quantiles",
    "QueueDepth",
    "Snapshot",
    "Stats",
    "UsageRow",
    "Verdict",
    "WindowFigures",
    "evaluate",
    "exposition",
]


@dataclass(frozen=True)
class BrokerFigures:
    """What the broker says: depths per queue and priority, dead letters, consumers, workers."""

    depths: tuple[QueueDepth, ...] = ()
    dead_letters: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    workers: tuple[str, ...] = ()


class Stats:
    """Takes snapshots of one deployment: its broker (through ``app``) and its history."""

    def __init__(self, app: PlatformCelery, session_factory: Callable[[], Session]) -> None:
        self.app = app
        self.session_factory = session_factory

    def snapshot(
        self, *, window: timedelta = DEFAULT_WINDOW, now: datetime | None = None
    ) -> Snapshot:
        """The broker's figures now, and the history's over ``[now - window, now]``."""
        if window <= timedelta(0):
            raise ValueError(f"the window must be positive, not {window}")
        now = now or datetime.now(UTC)
        unavailable: dict[str, str] = {}
        broker = BrokerFigures()
        try:
            broker = self.broker_figures()
        except BROKER_ERRORS as exc:
            log.warning("broker figures unavailable: %r", exc)
            unavailable["broker"] = _describe(exc)
        figures: WindowFigures | None = None
        try:
            with self.session_factory() as session:
                figures = window_figures(session, since=now - window, until=now)
        except SQLAlchemyError as exc:
            log.warning("history figures unavailable: %r", exc)
            unavailable["history"] = _describe(exc)
        return Snapshot(
            taken_at=now,
            depths=broker.depths,
            dead_letters=broker.dead_letters,
            consumers=broker.consumers,
            workers=broker.workers,
            window=figures,
            unavailable=unavailable,
        )

    def broker_figures(self) -> BrokerFigures:
        """Queue depths, dead letters and consumers; raises what the broker raises."""
        with self.app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0.5, timeout=5)
            depths = queue_depths(connection, self.app.topology)
        dead_letters = DeadLetters(self.app).counts()
        consumers, workers = queue_consumers(self.app)
        return BrokerFigures(tuple(depths), dead_letters, consumers, workers)

    def verdict(self, snapshot: Snapshot, thresholds: HealthThresholds | None = None) -> Verdict:
        """The health of ``snapshot`` against ``thresholds`` (default: the settings' limits)."""
        return evaluate(snapshot, thresholds or HealthThresholds.from_settings(self.app.settings))

    def health(
        self,
        *,
        window: timedelta = DEFAULT_WINDOW,
        thresholds: HealthThresholds | None = None,
        now: datetime | None = None,
    ) -> Verdict:
        return self.verdict(self.snapshot(window=window, now=now), thresholds)

    def prometheus(
        self, *, window: timedelta = DEFAULT_WINDOW, thresholds: HealthThresholds | None = None
    ) -> str:
        """The exposition (text format 0.0.4) of a fresh snapshot and its verdict."""
        snapshot = self.snapshot(window=window)
        return exposition(snapshot, self.verdict(snapshot, thresholds))

    def usage(
        self, *, since: date, until: date, tenant: str | None = None, job: str | None = None
    ) -> list[UsageRow]:
        """Usage per UTC day, tenant and job type over ``[since, until]`` (see stats.usage);
        raises what the history database raises."""
        with self.session_factory() as session:
            return usage_rows(session, since=since, until=until, tenant=tenant, job=job)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
