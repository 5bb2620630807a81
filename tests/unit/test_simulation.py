"""domain.simulation.perform: the scripted demo job (crash=True is not tested: it SIGKILLs)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tasks_platform.domain.simulation import Script, SimulatedOutage, SimulatedRejection, perform
from tasks_platform.jobs.demo import RETRY
from tasks_platform.jobs.retry import Verdict


def script(**overrides: object) -> Script:
    options: dict[str, object] = {
        "label": "job",
        "duration": 0.0,
        "fail_times": 0,
        "fail_permanently": False,
        "crash": False,
        "record_to": None,
    }
    options.update(overrides)
    return Script(**options)  # type: ignore[arg-type]


def test_a_plain_script_succeeds_on_the_first_attempt() -> None:
    assert perform(script(label="ok"), attempt=1) == {"label": "ok", "attempt": 1}


@pytest.mark.parametrize("fail_times", [1, 2, 5])
def test_fails_transiently_fail_times_then_succeeds(fail_times: int) -> None:
    plan = script(label="flaky", fail_times=fail_times)
    for attempt in range(1, fail_times + 1):
        with pytest.raises(SimulatedOutage, match=f"outage on attempt {attempt} of {fail_times}"):
            perform(plan, attempt=attempt)
    assert perform(plan, attempt=fail_times + 1) == {"label": "flaky", "attempt": fail_times + 1}


@pytest.mark.parametrize("attempt", [1, 2, 10])
def test_fail_permanently_raises_rejection_on_every_attempt(attempt: int) -> None:
    with pytest.raises(SimulatedRejection, match="doomed: rejected for good"):
        perform(script(label="doomed", fail_permanently=True), attempt=attempt)


def test_permanent_failure_wins_over_transient_failures() -> None:
    with pytest.raises(SimulatedRejection):
        perform(script(fail_permanently=True, fail_times=3), attempt=1)


def records(path: Path) -> list[list[str]]:
    """The record file as ``[label, attempt, pid, start|done, unix time]`` rows."""
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines()]


def test_record_to_appends_a_start_line_per_attempt_and_a_done_line_on_success(
    tmp_path: Path,
) -> None:
    record = tmp_path / "attempts.log"
    record.write_text("earlier line\n", encoding="utf-8")
    plan = script(label="rec", fail_times=2, record_to=str(record))
    before = time.time()
    for attempt in (1, 2):
        with pytest.raises(SimulatedOutage):
            perform(plan, attempt=attempt)
    perform(plan, attempt=3)
    after = time.time()
    lines = records(record)
    assert lines[0] == ["earlier", "line"]
    pid = str(os.getpid())
    assert [line[:4] for line in lines[1:]] == [
        ["rec", "1", pid, "start"],
        ["rec", "2", pid, "start"],
        ["rec", "3", pid, "start"],
        ["rec", "3", pid, "done"],
    ]
    stamps = [float(line[4]) for line in lines[1:]]
    assert stamps == sorted(stamps)
    assert before <= stamps[0]
    assert stamps[-1] <= after


def test_record_has_a_start_but_no_done_line_on_a_permanent_failure(tmp_path: Path) -> None:
    record = tmp_path / "attempts.log"
    with pytest.raises(SimulatedRejection):
        perform(script(label="p", fail_permanently=True, record_to=str(record)), attempt=1)
    assert [line[:4] for line in records(record)] == [["p", "1", str(os.getpid()), "start"]]


def test_duration_sleeps() -> None:
    started = time.monotonic()
    perform(script(duration=0.05), attempt=1)
    assert time.monotonic() - started >= 0.05


def test_demo_retry_policy_retries_outages_and_dead_letters_rejections() -> None:
    policy = RETRY.with_defaults(max_retries=5, backoff_base=2.0, backoff_max=600.0)
    assert policy.max_retries == 3
    assert policy.decide(SimulatedOutage("x"), 0).verdict is Verdict.RETRY
    assert policy.decide(SimulatedOutage("x"), 3).verdict is Verdict.EXHAUSTED
    assert policy.decide(SimulatedRejection("x"), 0).verdict is Verdict.PERMANENT
    assert all(policy.decide(SimulatedOutage("x"), n).delay <= 4.0 for n in range(3))


def test_an_effect_is_applied_once_per_key_however_often_the_job_runs(tmp_path: Path) -> None:
    plan = script(label="pay", effects_to=str(tmp_path / "effects"))
    first = perform(plan, attempt=1, effect_key="order-1")
    again = perform(plan, attempt=1, effect_key="order-1")  # a redelivery of the same job
    other = perform(plan, attempt=1, effect_key="order-2")
    assert (first["effect"], again["effect"], other["effect"]) == ("applied", "repeated", "applied")
    effects = sorted(p.read_text() for p in (tmp_path / "effects").glob("*.effect"))
    assert effects == ["order-1", "order-2"]
    outcomes = [
        line.split()[1] for line in (tmp_path / "effects" / "effects.log").read_text().splitlines()
    ]
    assert outcomes == ["applied", "repeated", "applied"]
