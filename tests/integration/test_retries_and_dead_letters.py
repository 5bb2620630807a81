"""Retries, dead-lettering and replay with a real worker process, on every broker."""

from __future__ import annotations

from conftest import Platform, wait_for

JOB = "demo.work"


def _dead(platform: Platform, count: int = 1, timeout: float = 60) -> list:
    return wait_for(
        lambda: (letters := platform.dead_letters().list()) and len(letters) >= count and letters,
        timeout, what=f"{count} dead letter(s)",
    )  # fmt: skip


def test_transient_failure_is_retried_after_its_backoff_then_succeeds(platform: Platform) -> None:
    runs = platform.runs()
    platform.worker()
    platform.task(JOB).delay(label="flaky", fail_times=2, record_to=str(runs.path))

    wait_for(lambda: runs.dones("flaky"), 60, what="the job to succeed")
    starts = runs.starts("flaky")
    assert [int(s[1]) for s in starts] == [1, 2, 3]
    times = [float(s[4]) for s in starts]
    first_delay, second_delay = times[1] - times[0], times[2] - times[1]
    # demo policy: base 0.5 s with equal jitter -> first in [0.25, 0.5], second in [0.5, 1.0].
    # What is seen is that delay plus the time the broker takes to hand the job out again
    # (up to a second on the embedded broker of a busy machine), so only the lower bounds are
    # exact here; the growth itself is RetryPolicy.backoff's, unit-tested in test_retry.py.
    assert first_delay >= 0.25
    assert second_delay >= 0.5
    assert platform.dead_letters().counts()["default"] == 0


def test_job_exhausting_retries_lands_once_in_dead_letter_queue(platform: Platform) -> None:
    runs = platform.runs()
    platform.worker()
    result = platform.task(JOB).delay(label="hopeless", fail_times=50, record_to=str(runs.path))

    [letter] = _dead(platform)
    assert letter.task_id == result.id
    assert letter.job == JOB
    assert letter.queue == "default"
    assert letter.reason == "retries_exhausted"
    assert letter.attempts == 4  # the first run and 3 retries
    assert letter.exception_type == "SimulatedOutage"
    assert "outage on attempt 4" in letter.exception_message
    assert "SimulatedOutage" in letter.traceback
    assert letter.payload[1]["label"] == "hopeless"  # the original body travels intact
    assert len(runs.starts()) == 4
    assert platform.dead_letters().counts() == {
        "ai": 0, "email": 0, "reports": 0, "webhooks": 0, "payments": 0, "default": 1,
    }  # fmt: skip


def test_permanent_error_is_dead_lettered_without_retry(platform: Platform) -> None:
    runs = platform.runs()
    platform.worker()
    platform.task("demo.send_email").delay(
        label="bounced", fail_permanently=True, record_to=str(runs.path)
    )

    [letter] = _dead(platform)
    assert (letter.reason, letter.queue, letter.attempts) == ("permanent_error", "email", 1)
    assert letter.exception_type == "SimulatedRejection"
    assert len(runs.starts()) == 1


def test_soft_time_limit_dead_letters_the_job(platform: Platform) -> None:
    platform.worker()
    platform.task(JOB).apply_async(
        kwargs={"label": "slow", "duration": 30}, soft_time_limit=1, time_limit=20
    )

    [letter] = _dead(platform)
    assert (letter.reason, letter.exception_type) == ("time_limit", "SoftTimeLimitExceeded")


def test_hard_time_limit_dead_letters_the_job(platform: Platform) -> None:
    platform.worker()
    platform.task(JOB).apply_async(
        kwargs={"label": "stuck", "duration": 30}, soft_time_limit=0.5, time_limit=1
    )

    [letter] = _dead(platform)
    assert letter.reason == "time_limit"


def test_replay_runs_a_dead_job_again_with_attempts_reset(platform: Platform) -> None:
    runs = platform.runs()
    platform.worker()
    result = platform.task(JOB).delay(
        label="again", fail_permanently=True, record_to=str(runs.path)
    )
    _dead(platform)

    replayed = platform.dead_letters().replay(task_id=result.id, actor="test")

    assert replayed == [result.id]
    wait_for(lambda: len(runs.starts()) == 2, 60, what="the replayed job to run")
    assert [s[1] for s in runs.starts()] == ["1", "1"]  # attempts start over
    [letter] = _dead(platform)  # it fails again, and is again in Q.dead exactly once
    assert letter.headers["x-tasks-replays"] == 1


def test_purge_removes_dead_letters_for_good(platform: Platform) -> None:
    platform.worker()
    task = platform.task(JOB)
    doomed = [task.delay(label=f"d{i}", fail_permanently=True).id for i in range(3)]
    _dead(platform, count=3)

    assert platform.dead_letters().purge(task_id=doomed[0], actor="test") == 1
    assert sorted(d.task_id for d in platform.dead_letters().list()) == sorted(doomed[1:])
    assert platform.dead_letters().purge(queue="default", actor="test") == 2
    assert platform.dead_letters().list() == []
