"""Progress reports, run time of every attempt and LLM tokens, as the writer merges them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from history_db import T0, both_engines_fixture, row, write  # noqa: F401 - the engine fixture
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tasks_platform.domain.simulation import Script, perform
from tasks_platform.history.models import JobEvent, JobState
from tasks_platform.history.recorder import Recorder, token_facts
from tasks_platform.history.repository import as_utc
from tasks_platform.history.writer import Transition
from tasks_platform.jobs.declaration import JobContext
from tasks_platform.settings import Settings


def events(engine: Engine, job_id: str = "j") -> int:
    with Session(engine) as session:
        count = session.scalar(select(func.count()).where(JobEvent.job_id == job_id))
        return int(count or 0)


def report(percent: float, note: str | None = None, *, attempt: int = 1, at: float = T0,
           replays: int = 0) -> Transition:  # fmt: skip
    facts = {"percent": percent, "progress_note": note}
    return Transition("j", JobState.STARTED, attempt, at, replays=replays, facts=facts,
                      report=True)  # fmt: skip


def started(attempt: int, at: float, *, replays: int = 0) -> Transition:
    return Transition("j", JobState.STARTED, attempt, at, replays=replays, worker=f"w{attempt}")


def test_a_report_changes_neither_state_nor_times_and_leaves_no_event(engine: Engine) -> None:
    write(engine, Transition("j", JobState.QUEUED, 1, T0), started(1, T0 + 1))
    before = row(engine)
    write(engine, report(40.0, "page 4 of 10", at=T0 + 5))

    job = row(engine)
    assert (job.percent, job.progress_note) == (40.0, "page 4 of 10")
    assert (job.state, job.progress, job.attempts) == ("started", before.progress, 1)
    assert job.started_at is not None
    assert as_utc(job.started_at).timestamp() == T0 + 1
    assert events(engine) == 2


def test_the_latest_report_of_the_attempt_wins(engine: Engine) -> None:
    write(engine, started(1, T0), report(10.0, "a"), report(20.0, "b"))
    assert (row(engine).percent, row(engine).progress_note) == (20.0, "b")
    write(engine, report(30.0))
    assert (row(engine).percent, row(engine).progress_note) == (30.0, None)
    write(engine, Transition("j", JobState.SUCCEEDED, 1, T0 + 9), report(35.0, "last words"))
    job = row(engine)
    assert (job.state, job.percent, job.progress_note) == ("succeeded", 35.0, "last words")


def test_a_new_attempt_forgets_the_last_ones_report_and_ignores_its_late_reports(
    engine: Engine,
) -> None:
    write(engine, started(1, T0), report(80.0, "attempt 1"))
    write(engine, Transition("j", JobState.RETRYING, 1, T0 + 2), started(2, T0 + 3))
    assert (row(engine).percent, row(engine).progress_note) == (None, None)

    write(engine, report(90.0, "attempt 1, late", attempt=1))
    assert row(engine).percent is None
    write(engine, report(5.0, "attempt 2"))
    assert row(engine).percent is None  # attempt 1 by default: still ignored
    write(engine, report(5.0, "attempt 2", attempt=2))
    assert (row(engine).percent, row(engine).progress_note) == (5.0, "attempt 2")


def test_a_replay_starts_without_a_report(engine: Engine) -> None:
    write(engine, started(1, T0), report(50.0), Transition("j", JobState.DEAD, 1, T0 + 1))
    write(engine, Transition("j", JobState.QUEUED, 1, T0 + 5, replays=1))
    assert row(engine).percent is None
    write(engine, report(60.0, attempt=1))  # the first life's report, arriving late
    assert row(engine).percent is None


def test_a_report_before_its_attempts_start_is_written_is_ignored(engine: Engine) -> None:
    write(engine, report(50.0))
    job = row(engine)
    assert (job.state, job.percent, job.attempts, job.started_at) == ("queued", None, 0, None)
    assert events(engine) == 0


def test_every_attempts_run_time_adds_up_once_whatever_the_order(engine: Engine) -> None:
    attempt1 = Transition("j", JobState.RETRYING, 1, T0 + 1, facts={"run_seconds": 1.5})
    attempt2 = Transition("j", JobState.FAILED, 2, T0 + 3, facts={"run_seconds": 2.0})
    dead = Transition("j", JobState.DEAD, 2, T0 + 4, facts={"dead_reason": "retries_exhausted"})
    # the dead letter and the next start come first; the attempts' ends arrive late
    write(engine, started(1, T0), started(2, T0 + 2), dead)
    write(engine, attempt2)
    write(engine, attempt1)
    write(engine, attempt1, attempt2, dead)  # the same batch again (a journal caught up twice)

    job = row(engine)
    assert job.state == "dead"
    assert job.run_seconds_total == pytest.approx(3.5)


def test_run_time_of_new_and_known_jobs_in_one_batch(engine: Engine) -> None:
    write(engine, started(1, T0))
    write(
        engine,
        Transition("j", JobState.SUCCEEDED, 1, T0 + 1, facts={"run_seconds": 0.25}),
        Transition("k", JobState.STARTED, 1, T0),
        Transition("k", JobState.SUCCEEDED, 1, T0 + 1, facts={"run_seconds": 0.5}),
        Transition("n", JobState.SUCCEEDED, 1, T0 + 1, facts={"run_seconds": None}),
    )
    assert (row(engine).run_seconds, row(engine).run_seconds_total) == (0.25, 0.25)
    assert row(engine, "k").run_seconds_total == 0.5
    assert row(engine, "n").run_seconds_total is None


def test_tokens_of_the_result_are_stored_with_the_success(engine: Engine) -> None:
    facts = {"result": {"text": "hi"}, "prompt_tokens": 12, "completion_tokens": 30}
    write(engine, started(1, T0), Transition("j", JobState.SUCCEEDED, 1, T0 + 1, facts=facts))
    job = row(engine)
    assert (job.prompt_tokens, job.completion_tokens) == (12, 30)


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, {"prompt_tokens": 3,
                                                                   "completion_tokens": 4}),
        ({"usage": {"prompt_tokens": 3, "total_tokens": 3}}, {"prompt_tokens": 3}),
        ({"usage": {"prompt_tokens": "3", "completion_tokens": True}}, {}),
        ({"usage": {"prompt_tokens": -1, "completion_tokens": 2.5}}, {}),
        ({"usage": [1, 2]}, {}),
        ([{"usage": {"prompt_tokens": 3}}], {}),
        (None, {}),
    ],
)  # fmt: skip
def test_token_facts_take_only_whole_token_counts(result: object, expected: dict[str, int]) -> None:
    assert token_facts(result) == expected


def test_a_report_survives_the_journal() -> None:
    original = report(12.5, "n")
    again = Transition.from_json(original.to_json())
    assert again == original
    assert again.report


def test_the_recorder_keeps_only_the_latest_report_of_a_job(tmp_path: Path, engine: Engine) -> None:
    settings = Settings(data_dir=tmp_path, history_flush_interval=60)
    recorder = Recorder(settings, engine)
    try:
        recorder.record(started(1, T0))
        for percent in range(1000):
            recorder.report(report(percent / 10, f"step {percent}"))
        assert recorder.pending() == 2
        assert recorder.flush_once()
        assert recorder.pending() == 0
    finally:
        recorder.close()
    job = row(engine)
    assert (job.percent, job.progress_note, job.state) == (99.9, "step 999", "started")


def test_report_progress_clamps_the_percent_cuts_the_note_and_refuses_non_numbers(
    tmp_path: Path,
) -> None:
    sent: list[tuple[float, str | None]] = []
    context = JobContext(id="j", name="demo.work", attempt=1, max_retries=0, queue=None,
                         settings=Settings(data_dir=tmp_path),
                         progress_sink=lambda p, n: sent.append((p, n)))  # fmt: skip
    context.report_progress(-3)
    context.report_progress(100.000001, "x" * 600)
    context.report_progress(42.5)
    assert sent == [(0.0, None), (100.0, "x" * 500), (42.5, None)]
    for wrong in (float("nan"), float("inf"), "50", True, None):
        with pytest.raises(ValueError, match="percent must be"):
            context.report_progress(wrong)  # type: ignore[arg-type]
    assert len(sent) == 3
    # a context made outside a worker has nowhere to report to: nothing happens
    replace(context, progress_sink=None).report_progress(50)


def test_a_script_reports_each_step_and_returns_its_usage() -> None:
    script = Script(label="s", duration=0.03, fail_times=0, fail_permanently=False, crash=False,
                    record_to=None, progress_steps=3, usage={"prompt_tokens": 1})  # fmt: skip
    reports: list[tuple[float, str | None]] = []
    result = perform(script, attempt=2, progress=lambda p, n: reports.append((p, n)))
    assert [round(p, 1) for p, _ in reports] == [33.3, 66.7, 100.0]
    assert reports[-1][1] == "attempt 2: step 3 of 3"
    assert result == {"label": "s", "attempt": 2, "usage": {"prompt_tokens": 1}}
