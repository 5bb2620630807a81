"""The beat schedule built from the settings: entries, cron parsing, validation, the command."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.schedules import crontab
from click.testing import CliRunner

import tasks_platform
from tasks_platform.application import PlatformCelery, create_app
from tasks_platform.cli import main
from tasks_platform.errors import ConfigurationError
from tasks_platform.schedules import (
    CLEAN_HISTORY,
    STATS_SNAPSHOT,
    PlatformScheduler,
    beat_jobs,
    effective_schedule,
    parse_cron,
    scheduled_jobs,
    state_file,
)
from tasks_platform.settings import ScheduleEntry, Settings

REPORT = {"title": "Sales", "columns": ["day", "total"], "rows": []}


def settings_with(tmp_path: Path, *entries: dict[str, Any], **overrides: Any) -> Settings:
    schedules = [ScheduleEntry(**entry) for entry in entries]
    return Settings(data_dir=tmp_path / "data", schedules=schedules, **overrides)


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Any]:
    apps: list[PlatformCelery] = []

    def make(*entries: dict[str, Any], **overrides: Any) -> PlatformCelery:
        app = create_app(settings_with(tmp_path, *entries, **overrides), set_as_current=False)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def test_platform_jobs_run_at_their_intervals_at_low_priority(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, cleanup_interval=900, stats_snapshot_interval=30)
    jobs = {job.name: job for job in scheduled_jobs(settings)}

    assert list(jobs) == [CLEAN_HISTORY, STATS_SNAPSHOT]
    assert jobs[CLEAN_HISTORY].job == "platform.clean_history"
    assert jobs[CLEAN_HISTORY].timing.run_every == timedelta(seconds=900)
    assert jobs[STATS_SNAPSHOT].timing.run_every == timedelta(seconds=30)
    # a run no worker took before the next one is due is dropped, not piled up
    assert jobs[CLEAN_HISTORY].publish_options() == {"priority": "low", "expires": 900}
    assert jobs[STATS_SNAPSHOT].publish_options() == {"priority": "low", "expires": 30}
    assert all(job.builtin for job in jobs.values())


def test_user_entries_keep_their_job_payload_priority_and_tenant(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path,
        {"name": "nightly sales", "job": "reports.render", "payload": REPORT,
         "cron": "30 2 * * mon-fri", "priority": "high", "tenant": "acme"},
        {"name": "tick", "job": "demo.noop", "every": 2.5},
    )  # fmt: skip
    nightly, tick = scheduled_jobs(settings)[2:]

    assert (nightly.name, nightly.job, nightly.payload) == (
        "nightly sales",
        "reports.render",
        REPORT,
    )
    assert nightly.publish_options() == {"priority": "high", "tenant": "acme"}
    assert nightly.description == "cron 30 2 * * mon-fri"
    assert isinstance(nightly.timing, crontab)
    assert nightly.timing.hour == {2}
    assert nightly.timing.minute == {30}
    assert nightly.timing.day_of_week == {1, 2, 3, 4, 5}
    assert tick.timing.run_every == timedelta(seconds=2.5)
    assert tick.publish_options() == {}
    assert not nightly.builtin


def test_celery_configuration_carries_the_schedule_and_a_state_file_in_the_data_folder(
    make_app: Any, tmp_path: Path
) -> None:
    app = make_app({"name": "tick", "job": "demo.noop", "every": 5, "tenant": "acme"})
    schedule = app.conf.beat_schedule

    assert set(schedule) == {CLEAN_HISTORY, STATS_SNAPSHOT, "tick"}
    assert schedule["tick"]["task"] == "demo.noop"
    assert schedule["tick"]["kwargs"] == {}
    assert schedule["tick"]["options"] == {"tenant": "acme"}
    assert schedule["tick"]["schedule"].run_every == timedelta(seconds=5)
    assert app.conf.beat_schedule_filename == str((tmp_path / "data" / "beat-schedule").resolve())
    assert app.conf.beat_scheduler == "tasks_platform.schedules:PlatformScheduler"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("*/15 * * * *", {"minute": {0, 15, 30, 45}, "hour": set(range(24))}),
        ("0 3 1 * *", {"minute": {0}, "hour": {3}, "day_of_month": {1}}),
        ("0 9 * 1,7 sun", {"month_of_year": {1, 7}, "day_of_week": {0}}),
        ("  5  4  *  *  1-5 ", {"minute": {5}, "hour": {4}, "day_of_week": {1, 2, 3, 4, 5}}),
        ("@daily", {"minute": {0}, "hour": {0}}),
        ("@hourly", {"minute": {0}, "hour": set(range(24))}),
    ],
)
def test_cron_lines_are_minute_hour_day_month_weekday(line: str, expected: dict[str, Any]) -> None:
    parsed = parse_cron(line)
    for field, values in expected.items():
        assert getattr(parsed, field) == values, field


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("* * * *", "five fields"),
        ("* * * * * *", "five fields"),
        ("", "five fields"),
        ("61 * * * *", "bad minute field '61'"),
        ("* 24 * * *", "bad hour field '24'"),
        ("* * 0 * *", "bad day of month field '0'"),
        ("* * * 13 *", "bad month field '13'"),
        ("* * * * someday", "bad day of week field 'someday'"),
        ("*/0 * * * *", "bad minute field"),
        ("@fortnightly", "five fields"),
    ],
)
def test_a_bad_cron_line_is_refused_naming_the_field(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cron(line)


def test_a_bad_cron_line_is_a_configuration_error_naming_the_entry(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path,
        {"name": "ok", "job": "demo.noop", "cron": "* * * * *"},
        {"name": "typo", "job": "demo.noop", "cron": "0 25 * * *"},
    )
    with pytest.raises(ConfigurationError, match=r"TASKS_SCHEDULES: schedule 'typo': bad hour"):
        scheduled_jobs(settings)


@pytest.mark.parametrize("name", ["twice", CLEAN_HISTORY])
def test_entry_names_are_unique_platform_ones_included(tmp_path: Path, name: str) -> None:
    entries = [{"name": name, "job": "demo.noop", "every": 1}] * (2 if name == "twice" else 1)
    with pytest.raises(ConfigurationError, match=f"schedule '{name}' is named twice"):
        scheduled_jobs(settings_with(tmp_path, *entries))


def test_app_configuration_leaves_a_bad_entry_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers and the API start; only beat (and the command) refuse the schedule."""
    settings = settings_with(tmp_path, {"name": "typo", "job": "demo.noop", "cron": "x"})
    with caplog.at_level(logging.WARNING, logger="tasks_platform.schedules"):
        names = [job.name for job in beat_jobs(settings)]
    assert names == [CLEAN_HISTORY, STATS_SNAPSHOT]
    assert "schedule 'typo'" in caplog.text
    assert "beat will refuse to start" in caplog.text


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"job": "reports.nope", "every": 1}, "no job type named 'reports.nope'; declared: .*"),
        ({"job": "reports.render", "every": 1, "payload": {"title": "x"}},
         "invalid payload for reports.render: columns: Field required"),
        ({"job": "email.send", "every": 1, "payload": {"to": ["not an address"], "subject": "s",
                                                      "text": "t"}},
         "invalid payload for email.send: to.0: .*not an e-mail address"),
        ({"job": "demo.noop", "every": 1, "priority": "urgent"}, "unknown priority 'urgent'"),
        ({"job": "demo.noop", "every": 1, "tenant": "a b"}, "tenant must be 1-200"),
    ],
)  # fmt: skip
def test_beat_refuses_unknown_jobs_and_payloads_the_job_type_refuses(
    make_app: Any, entry: dict[str, Any], message: str
) -> None:
    app = make_app({"name": "mine", **entry}, {"name": "fine", "job": "demo.noop", "every": 1})
    with pytest.raises(ConfigurationError, match=f"TASKS_SCHEDULES: schedule 'mine': {message}"):
        effective_schedule(app)


def test_every_problem_is_named_at_once(make_app: Any) -> None:
    app = make_app(
        {"name": "one", "job": "nope.one", "every": 1},
        {"name": "two", "job": "reports.render", "every": 1},
    )
    with pytest.raises(ConfigurationError) as raised:
        effective_schedule(app)
    assert "schedule 'one'" in str(raised.value)
    assert "schedule 'two'" in str(raised.value)


def test_next_runs_are_cron_times_or_one_interval_after_start(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path,
        {"name": "nightly", "job": "demo.noop", "cron": "30 2 * * *"},
        {"name": "tick", "job": "demo.noop", "every": 90},
    )
    now = datetime(2026, 3, 4, 12, 0, 7, 123_000, tzinfo=UTC)
    nightly, tick = scheduled_jobs(settings)[2:]

    assert nightly.next_run(now) == datetime(2026, 3, 5, 2, 30, tzinfo=UTC)
    assert tick.next_run(now) == now + timedelta(seconds=90)
    assert nightly.as_dict(now)["next_run"] == "2026-03-05T02:30:00+00:00"


def test_beat_scheduler_keeps_its_state_in_the_data_folder_without_celery_extras(
    make_app: Any, tmp_path: Path
) -> None:
    app = make_app({"name": "tick", "job": "demo.noop", "every": 1})
    scheduler = PlatformScheduler(app=app, schedule_filename=state_file(app.settings))
    try:
        # no celery.backend_cleanup: platform.clean_history cleans the result backend too
        assert set(scheduler.schedule) == {CLEAN_HISTORY, STATS_SNAPSHOT, "tick"}
        assert scheduler.schedule["tick"].options == {}
        assert scheduler.schedule[CLEAN_HISTORY].options == {"priority": "low", "expires": 3600}
    finally:
        scheduler.close()
    assert list((tmp_path / "data").glob("beat-schedule*"))


def test_beat_scheduler_refuses_to_start_on_a_bad_schedule(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app({"name": "mine", "job": "nope.job", "every": 1})
    with caplog.at_level(logging.CRITICAL), pytest.raises(SystemExit) as raised:
        PlatformScheduler(app=app, schedule_filename=state_file(app.settings))
    assert raised.value.code == 1
    assert "beat cannot start: TASKS_SCHEDULES: schedule 'mine': no job type" in caplog.text


def test_schedules_command_lists_the_effective_schedule(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(
        {"name": "nightly sales", "job": "reports.render", "payload": REPORT,
         "cron": "30 2 * * *", "tenant": "acme"},
    )  # fmt: skip
    monkeypatch.setattr(tasks_platform, "app", app)

    result = CliRunner().invoke(main, ["schedules"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(line for line in lines if line.startswith("nightly sales"))
    assert "reports.render" in row
    assert "cron 30 2 * * *" in row
    assert "acme" in row
    assert " 02:30:00 " in row
    assert any(line.startswith(CLEAN_HISTORY) and "every 3600s" in line for line in lines)
    assert "3 periodic job(s)" in result.output

    as_json = CliRunner().invoke(main, ["schedules", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert len(as_json.output.splitlines()) == 3


def test_schedules_command_refuses_a_bad_schedule(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks_platform, "app", make_app({"name": "x", "job": "nope.x", "every": 1}))
    result = CliRunner().invoke(main, ["schedules"])
    assert isinstance(result.exception, ConfigurationError)
    assert "schedule 'x': no job type named 'nope.x'" in str(result.exception)
