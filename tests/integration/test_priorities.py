"""Priority names are mapped so that each broker serves urgent work first."""

from __future__ import annotations

from conftest import Platform, wait_for


def test_critical_job_queued_behind_100_low_ones_runs_first(server_platform: Platform) -> None:
    platform = server_platform
    runs = platform.runs()
    task = platform.task("demo.work")
    for number in range(100):  # no worker yet: the queue is effectively paused
        task.apply_async(kwargs={"label": f"low{number}", "record_to": str(runs.path)},
                         priority="low")  # fmt: skip
    task.apply_async(kwargs={"label": "urgent", "record_to": str(runs.path)}, priority="critical")

    platform.worker(concurrency=1)

    wait_for(lambda: len(runs.dones()) >= 5, 60, what="the first jobs to run")
    assert runs.starts()[0][0] == "urgent"


def test_priorities_order_high_before_normal_before_low(server_platform: Platform) -> None:
    platform = server_platform
    runs = platform.runs()
    task = platform.task("demo.work")
    for level in ("low", "normal", "high", "low", "normal", "high"):
        task.apply_async(kwargs={"label": level, "record_to": str(runs.path)}, priority=level)

    platform.worker(concurrency=1)

    wait_for(lambda: len(runs.dones()) == 6, 60, what="all six jobs")
    assert [s[0] for s in runs.starts()] == ["high", "high", "normal", "normal", "low", "low"]
