"""A job whose worker dies is redelivered; one that kills its worker every time is poison."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import Platform, make_platform, wait_for


def test_job_whose_pool_process_is_killed_is_redelivered_and_completes(
    platform: Platform,
) -> None:
    runs = platform.runs()
    worker = platform.worker(concurrency=1)
    platform.task("demo.work").delay(label="victim", duration=5, record_to=str(runs.path))
    [first] = wait_for(runs.starts, 60, what="the job to start")

    os.kill(int(first[2]), signal.SIGKILL)  # the pool process running the job

    wait_for(lambda: runs.dones("victim"), 90, what="the redelivered job to complete")
    assert len(runs.starts("victim")) == 2
    assert worker.process is not None
    assert worker.process.poll() is None
    assert platform.dead_letters().list() == []


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_job_running_when_its_whole_worker_is_killed_is_redelivered(
    broker: str, tmp_path: Path
) -> None:
    # Redis hands an unacknowledged job out again after the visibility timeout
    with make_platform(
        broker, tmp_path, visibility_timeout=6, backoff_max=4, redis_restore_interval=1
    ) as platform:
        runs = platform.runs()
        crashed = platform.worker(concurrency=1)
        platform.task("demo.work").delay(label="orphan", duration=3, record_to=str(runs.path))
        wait_for(runs.starts, 60, what="the job to start")

        crashed.kill()  # main process and pool: nothing acknowledges the job
        platform.worker(concurrency=1)

        wait_for(lambda: runs.dones("orphan"), 90, what="the job to run again and complete")
        assert len(runs.starts("orphan")) == 2


def test_poison_job_is_dead_lettered_after_bounded_deliveries(platform: Platform) -> None:
    runs = platform.runs()
    worker = platform.worker()
    result = platform.task("demo.work").delay(label="poison", crash=True, record_to=str(runs.path))

    [letter] = wait_for(platform.dead_letters().list, 120, what="the poison job in Q.dead")
    assert letter.task_id == result.id
    assert letter.reason == "poison"
    assert letter.attempts == platform.settings.max_deliveries == 3
    assert letter.exception_type == "WorkerLostError"
    assert len(runs.starts()) == 3  # it ran (and killed its process) exactly three times

    platform.task("demo.work").delay(label="next", record_to=str(runs.path))
    wait_for(lambda: runs.dones("next"), 60, what="the worker to keep serving")
    assert worker.process is not None
    assert worker.process.poll() is None
