"""Pure figures logic: health rules, quantiles, durations, cursors and Prometheus text."""

from __future__ import annotations

import base64
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import click
import pytest
from click.testing import CliRunner

from tasks_platform.cli import main, parse_duration
from tasks_platform.errors import InvalidPayload
from tasks_platform.history.repository import Cursor
from tasks_platform.settings import load_settings
from tasks_platform.stats import (
    HealthThresholds,
    JobFigures,
    Level,
    Quantiles,
    QueueDepth,
    Snapshot,
    WindowFigures,
    evaluate,
    exposition,
)
from tasks_platform.stats.prometheus import Sample, escape_label_value, format_value, metric
from tasks_platform.stats.snapshot import quantiles
from tasks_platform.topology import QUEUES

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
ALL_CONSUMED = {queue: ("w1@host",) for queue in QUEUES}


def snapshot(
    *,
    depths: dict[str, int] | None = None,
    consumers: dict[str, tuple[str, ...]] | None = None,
    dead: dict[str, int] | None = None,
    jobs: tuple[JobFigures, ...] = (),
    unavailable: dict[str, str] | None = None,
) -> Snapshot:
    waiting = {queue: 0 for queue in QUEUES} | (depths or {})
    window = WindowFigures(since=NOW - timedelta(minutes=15), until=NOW, jobs=jobs)
    return Snapshot(
        taken_at=NOW,
        depths=tuple(QueueDepth(queue, "all", n) for queue, n in waiting.items()),
        dead_letters={queue: 0 for queue in QUEUES} | (dead or {}),
        consumers=ALL_CONSUMED if consumers is None else consumers,
        workers=("w1@host",),
        window=window,
        unavailable=unavailable or {},
    )


def rules(verdict_snapshot: Snapshot, **limits: float) -> list[tuple[str, str, str]]:
    verdict = evaluate(verdict_snapshot, HealthThresholds(**limits))
    return [(a.level.value, a.rule, a.subject) for a in verdict.alerts]


# -- health ------------------------------------------------------------------------------------
def test_quiet_platform_is_healthy_with_no_alerts() -> None:
    verdict = evaluate(snapshot())
    assert verdict.level is Level.HEALTHY
    assert verdict.alerts == ()
    assert verdict.level.exit_code == 0


def test_non_empty_queue_that_no_worker_consumes_is_critical() -> None:
    verdict = evaluate(snapshot(depths={"email": 3}, consumers={"default": ("w1@host",)}))
    assert verdict.level is Level.CRITICAL
    assert verdict.level.exit_code == 2
    [alert] = verdict.alerts
    assert (alert.rule, alert.subject, alert.value) == ("unconsumed_queue", "email", 3)
    assert "email" in alert.message


def test_empty_queues_without_workers_are_fine() -> None:
    assert evaluate(snapshot(consumers={})).level is Level.HEALTHY


@pytest.mark.parametrize(
    ("depth", "expected"), [(50, []), (51, [("warning", "queue_depth", "ai")])]
)
def test_queue_deeper_than_the_limit_warns(depth: int, expected: list[tuple[str, ...]]) -> None:
    assert rules(snapshot(depths={"ai": depth})) == expected


def test_queue_depth_counts_every_priority_of_the_queue() -> None:
    base = snapshot()
    split = Snapshot(
        taken_at=NOW,
        depths=tuple(QueueDepth("ai", p, 20) for p in ("critical", "high", "normal", "low")),
        consumers=ALL_CONSUMED,
        window=base.window,
    )
    assert split.depth("ai") == 80
    assert rules(split) == [("warning", "queue_depth", "ai")]


def test_any_dead_letter_warns_and_names_its_queue() -> None:
    verdict = evaluate(snapshot(dead={"payments": 1}))
    assert verdict.level is Level.WARNING
    assert [(a.rule, a.subject, a.value) for a in verdict.alerts] == [
        ("dead_letters", "payments", 1)
    ]
    assert "payments.dead" in verdict.alerts[0].message


@pytest.mark.parametrize(("unsuccessful", "alerts"), [(10, 0), (11, 1)])
def test_more_than_ten_failed_or_dead_jobs_of_a_type_warn(unsuccessful: int, alerts: int) -> None:
    figures = JobFigures(
        job="email.send", failed=unsuccessful, dead=unsuccessful, unsuccessful=unsuccessful
    )
    found = rules(snapshot(jobs=(figures,)))
    assert found == [("warning", "unsuccessful_jobs", "email.send")] * alerts


def test_slow_wait_p95_warns_per_job_type() -> None:
    slow = JobFigures(job="reports.render", wait=Quantiles(p50=5, p95=61, p99=70, count=9))
    fast = JobFigures(job="email.send", wait=Quantiles(p50=1, p95=60, p99=90, count=9))
    assert rules(snapshot(jobs=(slow, fast))) == [("warning", "wait_p95", "reports.render")]


def test_thresholds_are_configurable() -> None:
    assert rules(snapshot(depths={"ai": 5}), max_queue_depth=4) == [
        ("warning", "queue_depth", "ai")
    ]
    assert rules(snapshot(dead={"ai": 2}), max_dead_letters=2) == []


def test_thresholds_come_from_the_health_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKS_HEALTH_MAX_QUEUE_DEPTH", "4")
    monkeypatch.setenv("TASKS_HEALTH_MAX_DEAD_LETTERS", "2")
    monkeypatch.setenv("TASKS_HEALTH_MAX_UNSUCCESSFUL_JOBS", "3")
    monkeypatch.setenv("TASKS_HEALTH_MAX_WAIT_P95", "1.5")
    limits = HealthThresholds.from_settings(load_settings())
    assert limits == HealthThresholds(
        max_unsuccessful_jobs=3, max_queue_depth=4, max_dead_letters=2, max_wait_p95_seconds=1.5
    )
    verdict = evaluate(snapshot(depths={"ai": 5}, dead={"email": 2}), limits)
    assert [(a.rule, a.subject) for a in verdict.alerts] == [("queue_depth", "ai")]


def test_unreadable_broker_is_critical_and_unreadable_history_a_warning() -> None:
    assert rules(snapshot(unavailable={"history": "down"})) == [
        ("warning", "unavailable", "history")
    ]
    verdict = evaluate(snapshot(unavailable={"broker": "refused", "history": "down"}))
    assert verdict.level is Level.CRITICAL


def test_critical_alerts_come_first_and_decide_the_level() -> None:
    verdict = evaluate(snapshot(depths={"ai": 60}, consumers={}, dead={"email": 1}))
    assert verdict.level is Level.CRITICAL
    assert [a.level for a in verdict.alerts] == [Level.CRITICAL, Level.WARNING, Level.WARNING]
    assert verdict.as_dict()["level"] == "critical"


# -- quantiles and rates -----------------------------------------------------------------------
def test_quantiles_of_one_to_a_hundred() -> None:
    figures = quantiles(float(n) for n in range(100, 0, -1))
    assert figures.p50 == pytest.approx(50.5)
    assert figures.p95 == pytest.approx(95.05)
    assert figures.p99 == pytest.approx(99.01)
    assert (figures.count, figures.total) == (100, 5050)


def test_quantiles_of_nothing_and_of_one_value() -> None:
    assert quantiles([]) == Quantiles()
    assert quantiles([7.0]) == Quantiles(p50=7.0, p95=7.0, p99=7.0, count=1, total=7.0)


def test_rates_count_jobs_that_ended_and_attempts_retried() -> None:
    figures = JobFigures(job="x", succeeded=90, failed=10, dead=10, unsuccessful=10, retrying=20)
    assert figures.success_rate == pytest.approx(0.9)
    assert figures.failure_rate == pytest.approx(0.1)
    assert figures.retry_rate == pytest.approx(20 / 120)
    assert JobFigures(job="idle").success_rate is None


# -- durations ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(minutes=90)),
        ("0.5h", timedelta(minutes=30)),
        (" 15M ", timedelta(minutes=15)),
    ],
)
def test_durations_are_parsed(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "15", "m", "1w", "-5m", "0s", "1h 3", "5 minutes", "1.m", "99999999999d", "36526d"]
)
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_duration(text)


def test_a_bad_duration_on_the_command_line_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["health", "--window", "soon"])
    assert result.exit_code == 2
    assert "Invalid value for '--window'" in result.output


def test_a_bad_since_on_the_command_line_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["jobs", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "Invalid value for '--since'" in result.output


# -- cursors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("queued_at", [NOW.replace(microsecond=123456), None])
def test_cursor_round_trips_and_is_url_safe(queued_at: datetime | None) -> None:
    cursor = Cursor(queued_at=queued_at, id="job/+id=1")
    text = cursor.encode()
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert Cursor.decode(text) == cursor


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        "garbage!",
        "",
        _b64(b"not json"),
        _b64(b'{"a": 1}'),
        _b64(b'["2025-01-01", 5]'),
        _b64(b'["yesterday", "x"]'),
        _b64(b"[1, 2, 3]"),
        _b64(b"\xff\xfe"),
    ],
)
def test_malformed_cursors_are_invalid_payloads(text: str) -> None:
    with pytest.raises(InvalidPayload, match="malformed page cursor"):
        Cursor.decode(text)


# -- Prometheus --------------------------------------------------------------------------------
def test_label_values_are_escaped() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    text = metric(
        "tasks_x", "gauge", "help with \\ and\nnewline", [Sample({"queue": 'we"ird\\'}, 1)]
    )
    assert text.splitlines() == [
        "# HELP tasks_x help with \\\\ and\\nnewline",
        "# TYPE tasks_x gauge",
        'tasks_x{queue="we\\"ird\\\\"} 1',
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [(3, "3"), (2.5, "2.5"), (math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf")],
)
def test_values_are_formatted(value: float, text: str) -> None:
    assert format_value(value) == text


def test_exposition_has_every_family_and_valid_lines() -> None:
    figures = JobFigures(
        job='odd"job',
        finished=3,
        per_minute=0.2,
        succeeded=3,
        wait=Quantiles(1, 2, 3, 3, 6.0),
        run=Quantiles(4, 5, 6, 3, 15.0),
    )
    window = WindowFigures(NOW - timedelta(minutes=15), NOW, jobs=(figures,), total=figures)
    shot = replace(snapshot(depths={"ai": 4}), window=window)
    text = exposition(shot, evaluate(shot))
    lines = text.splitlines()
    assert text.endswith("\n")
    assert 'tasks_queue_depth{queue="ai",priority="all"} 4' in lines
    assert 'tasks_jobs_window{job="odd\\"job",state="succeeded"} 3' in lines
    assert 'tasks_wait_seconds{quantile="0.95"} 2' in lines
    assert "tasks_run_seconds_sum 15" in lines
    assert "tasks_run_seconds_count 3" in lines
    assert "tasks_workers_active 1" in lines
    assert "tasks_health_level 0" in lines
    assert 'tasks_source_up{source="broker"} 1' in lines
    for line in lines:
        if not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            assert series.startswith("tasks_")
            float(value)  # every value parses
    families = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(families) == len(set(families))


def test_exposition_leaves_out_what_could_not_be_read() -> None:
    shot = Snapshot(taken_at=NOW, unavailable={"broker": "refused", "history": "down"})
    lines = exposition(shot, evaluate(shot)).splitlines()
    assert not any(line.startswith("tasks_queue_depth") for line in lines)
    assert 'tasks_source_up{source="broker"} 0' in lines
    assert "tasks_health_level 2" in lines
