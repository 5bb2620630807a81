"""Worker processes SIGKILLed again and again mid-run: no job lost, no effect applied twice.

Two workers of two pool processes each run a few hundred jobs while, every second, either a
pool process of the first worker is SIGKILLed (its worker replaces it; the job is rejected
and redelivered) or the whole second worker is (main process and pool, as a host crash: the
broker hands its unacknowledged jobs out again; Redis after the visibility timeout) and a
new worker is started in its place (four faults, 0.8 s apart).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_for

from faults.scenario import Workload, fault_platform

ROUNDS = 4
#: a job may be killed under its worker several times here: that is not poison
SETTINGS = {"visibility_timeout": 10.0, "redis_restore_interval": 1, "backoff_max": 5.0,
            "max_deliveries": 10}  # fmt: skip


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_workers_killed_repeatedly_lose_no_job_and_apply_each_effect_once(
    broker: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Redis: a private server, as the short visibility timeout must not touch other tests' jobs
    private = (
        {"broker_url": request.getfixturevalue("private_redis").url} if broker == "redis" else {}
    )
    with fault_platform(broker, tmp_path, **private, **SETTINGS) as platform:
        steady = platform.worker(concurrency=2, start=False).start(platform.app, wait=False)
        victim = platform.worker(concurrency=2)
        steady.wait_ready(platform.app)
        work = Workload(platform, "worker-kill", jobs=200, duration=0.05)
        work.submit_all()
        killed: set[str] = set()
        for round_ in range(ROUNDS):
            time.sleep(0.8)
            if work.done() >= work.jobs:
                break
            if round_ % 2 == 0:
                children = steady.child_pids()
                if children:
                    os.kill(children[0], signal.SIGKILL)
                    killed.add(str(children[0]))
                    work.faults.append("pool process SIGKILLed")
            else:
                killed.update(str(pid) for pid in [victim.pid, *victim.child_pids()])
                victim.kill()
                work.faults.append("whole worker SIGKILLed and replaced")
                victim = platform.worker(concurrency=2)

        work.wait_finished(timeout=90)
        # a job may run again only if every earlier run of it was in a killed process
        work.check(duplicate_allowed=lambda runs: all(r[2] in killed for r in runs[:-1]))


def test_a_throughput_profile_worker_killed_mid_batch_loses_no_job(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A solo worker with 32 jobs in flight takes them from Redis in batches, each job on the
    books (the unacknowledged hash) before any of the batch runs: SIGKILLed with a batch in
    hand, its jobs come back after the visibility timeout, and run on another worker."""
    private = {"broker_url": request.getfixturevalue("private_redis").url}
    profile = {"prefetch_multiplier": 32, "task_events": False}
    with fault_platform("redis", tmp_path, **private, **SETTINGS, **profile) as platform:
        work = Workload(platform, "profile-kill", jobs=300, duration=0.02)
        work.submit_all()  # on the queue before the victim starts: it fetches full batches
        killed: set[str] = set()
        for round_ in range(ROUNDS // 2):
            victim = platform.worker(pool="solo", concurrency=1)
            ran = 40 * (round_ + 1)
            wait_for(lambda ran=ran: work.done() > ran, 60, what="the victim to run jobs")
            killed.add(str(victim.pid))
            victim.kill()
            work.faults.append("throughput-profile worker SIGKILLed mid-batch")
        platform.worker(pool="solo", concurrency=1)

        work.wait_finished(timeout=90)
        work.check(duplicate_allowed=lambda runs: all(r[2] in killed for r in runs[:-1]))
