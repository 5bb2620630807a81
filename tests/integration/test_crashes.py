"""A job whose worker dies is redelivered; one that kills its worker every time is poison."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SHORT_VISIBILITY_REDIS_URL, Platform, make_platform, wait_for


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
    with make_platform(broker, tmp_path, **_short_visibility_timeout(broker)) as platform:
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


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_worker_killed_between_dead_lettering_and_ack_loses_nothing(
    broker: str, tmp_path: Path
) -> None:
    launcher = [sys.executable, str(Path(__file__).with_name("kill_after_dead_letter.py"))]
    with make_platform(broker, tmp_path, **_short_visibility_timeout(broker)) as platform:
        dying = platform.worker(concurrency=1, launcher=launcher)
        result = platform.task("demo.work").delay(label="doomed", fail_permanently=True)
        wait_for(lambda: dying.process.poll() is not None, 60, what="the worker to die")
        dying.kill()

        platform.worker(concurrency=1)  # gets the unacknowledged job again

        letters = wait_for(
            lambda: (found := platform.dead_letters().list()) and len(found) == 2 and found,
            90, what="the second copy",
        )  # fmt: skip
        assert {letter.task_id for letter in letters} == {result.id}  # recognisable by id
        replayed = platform.dead_letters().replay(task_id=result.id, actor="test")
        assert replayed == [result.id]  # collapsed
        [again] = wait_for(platform.dead_letters().list, 60, what="the replayed job to die")
        assert again.task_id == result.id


def test_each_dead_letter_lands_once_while_pool_processes_are_replaced(
    server_platform: Platform,
) -> None:
    # every poison delivery replaces a pool process; dead letters published meanwhile
    # must not be duplicated by the new process closing inherited broker connections
    platform = server_platform
    platform.worker(concurrency=2)
    task = platform.task("demo.work")
    ids = {task.delay(label=f"p{i}", crash=True).id for i in range(2)}
    ids |= {task.delay(label=f"d{i}", fail_permanently=True).id for i in range(20)}

    wait_for(lambda: len(platform.dead_letters().list()) >= 22, 120, what="22 dead letters")
    time.sleep(2)  # a duplicate would arrive late
    letters = platform.dead_letters().list()
    assert sorted(letter.task_id for letter in letters) == sorted(ids)


def _short_visibility_timeout(broker: str) -> dict[str, Any]:
    """Redis hands an unacknowledged job out again after 6 s (on a database of its own)."""
    options: dict[str, Any] = {"visibility_timeout": 6, "backoff_max": 4,
                               "redis_restore_interval": 1}  # fmt: skip
    if broker == "redis":
        options["broker_url"] = SHORT_VISIBILITY_REDIS_URL
    return options
