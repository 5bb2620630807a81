"""A job's progress reports, on a real worker: live in the history, as monitoring events, and
without disturbing the job's state, attempts, events or run time."""

from __future__ import annotations

from pathlib import Path

from conftest import wait_for
from control_helpers import control_platform, job_row, settled_event_states, submit, wait_state
from event_tap import EventTap

from tasks_platform.history.models import Job


def test_progress_reports_show_live_per_attempt_and_change_nothing_else(
    tmp_path: Path,
) -> None:
    with control_platform("rabbitmq", tmp_path, history_flush_interval=0.2) as platform:
        runs = platform.runs()
        with EventTap(platform.app, "task-progress") as events:
            platform.worker(concurrency=1)
            # attempt 1 reports 8 steps over 4 s, then fails transiently; attempt 2 succeeds.
            # 4 s: the history writer (at a lower priority) may lag a second or more on a
            # loaded machine, and a report is only seen while its attempt still runs
            job_id = submit(platform, "steps", runs, duration=4.0, progress_steps=8, fail_times=1)

            def reporting() -> Job | None:
                job = job_row(platform, job_id)
                running = job is not None and job.state == "started" and job.attempts == 1
                return job if running and job.percent is not None and job.percent < 100 else None

            midway = wait_for(reporting, 30, what="a report of attempt 1 while it runs")
            assert midway.progress_note is not None
            assert midway.progress_note.startswith("attempt 1: step ")
            assert (midway.state, midway.finished_at) == ("started", None)

            job = wait_state(platform, job_id, "succeeded")
            wait_for(lambda: any(e["percent"] == 100.0 for e in events.seen if
                                 e["uuid"] == job_id and "attempt 2" in e["note"]),
                     15, what="the task-progress event of attempt 2's last step")  # fmt: skip

        assert (job.percent, job.progress_note) == (100.0, "attempt 2: step 8 of 8")
        assert job.attempts == 2
        # no event row per report: just the job's own transitions
        expected = ["queued", "started", "retrying", "started", "succeeded"]
        assert settled_event_states(platform, job_id, expected) == expected
        # both attempts ran about 4 s: the total counts each once, run_seconds the last one
        assert job.run_seconds is not None
        assert job.run_seconds_total is not None
        assert 3.9 < job.run_seconds < 8.0
        assert 7.8 < job.run_seconds_total < 16.0
        assert abs(job.run_seconds_total - job.run_seconds) > 3.9

        mine = [e for e in events.seen if e["uuid"] == job_id]
        assert {e["type"] for e in mine} == {"task-progress"}
        assert all(0 <= e["percent"] <= 100 for e in mine)
        assert any(e["note"].startswith("attempt 1: ") for e in mine)
        # at most one event a second (plus each attempt's 100 %): 4 s of reports per attempt,
        # 16 reports in all
        assert len(mine) <= 10
