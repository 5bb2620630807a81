"""Redis visibility timeout: long jobs are not delivered again while their worker lives.

A Redis database of its own: kombu keeps one unacked hash per database, and the short
visibility timeout here would make these workers' sweeps hand out other tests' running jobs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Platform, make_platform, wait_for

VISIBILITY_REDIS_URL = os.environ.get("TEST_VISIBILITY_REDIS_URL", "redis://127.0.0.1:6379/11")
VISIBILITY = 3.0
LONG = 2.5 * VISIBILITY  # each long job outlives its lease two times over


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    with make_platform("redis", tmp_path, broker_url=VISIBILITY_REDIS_URL,
                       visibility_timeout=VISIBILITY, redis_restore_interval=1,
                       backoff_max=2.0) as made:  # fmt: skip
        yield made


def test_jobs_longer_than_the_visibility_timeout_run_once_while_their_worker_lives(
    platform: Platform,
) -> None:
    runs = platform.runs()
    platform.worker(concurrency=2)
    work = platform.task("demo.work")
    for label in ("long-1", "long-2"):
        work.delay(label=label, duration=LONG, record_to=str(runs.path))
    # held by the worker for its countdown, longer than the visibility timeout too
    work.apply_async(kwargs={"label": "later", "record_to": str(runs.path)},
                     countdown=VISIBILITY + 2)  # fmt: skip

    wait_for(lambda: len(runs.dones()) == 3, 4 * LONG + 30, what="the three jobs")
    starts = sorted(r[0] for r in runs.starts())
    assert starts == ["later", "long-1", "long-2"]  # none was delivered a second time


def test_job_of_a_killed_worker_is_still_delivered_again_after_the_visibility_timeout(
    platform: Platform,
) -> None:
    runs = platform.runs()
    doomed = platform.worker(concurrency=1)
    platform.task("demo.work").delay(label="orphan", duration=1.5, record_to=str(runs.path))
    wait_for(lambda: runs.starts("orphan"), 30, what="the job to start")
    doomed.kill()  # the whole worker: nobody renews its lease any more

    platform.worker(concurrency=1)
    wait_for(lambda: runs.dones("orphan"), 6 * VISIBILITY + 30, what="the job to run again")
    assert len(runs.starts("orphan")) == 2
