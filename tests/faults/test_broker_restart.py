"""The broker crashes mid-run and comes back: no job a producer was told was accepted is lost.

Redis runs with its append-only file fsynced on every write (``appendfsync always``), RabbitMQ
with durable queues, persistent messages and publisher confirms; each is SIGKILLed (a crash,
not a clean shutdown) while a producer submits and a worker runs jobs, and started again on
the same port and data a second later.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from faults.scenario import Workload, fault_platform

#: Redis hands a job whose worker lost its connection out again after the visibility timeout
SETTINGS = {"visibility_timeout": 10.0, "redis_restore_interval": 1, "backoff_max": 5.0}
OUTAGE = 1.0
BROKER_ERRORS = {
    "tasks_platform.errors.BrokerUnavailable",
    "tasks_platform.errors.PublishNotConfirmed",
}


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_broker_crash_mid_run_loses_no_accepted_job(
    broker: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue(f"private_{broker}")
    with fault_platform(broker, tmp_path, broker_url=server.url, **SETTINGS) as platform:
        platform.worker(concurrency=2)
        work = Workload(platform, "broker-restart", jobs=200, duration=0.05)
        producer = work.submit_in_background(pace=0.02)
        wait_for_accepted(work, 60)

        down_at = time.time()
        server.crash()
        time.sleep(OUTAGE)
        server.start()
        back_at = time.time()
        work.faults.append(f"{broker} SIGKILLed, restarted after {back_at - down_at:.1f}s")

        producer.join(timeout=120)
        work.wait_finished(timeout=90)
        # a job may run again only if its earlier run was cut off by the outage
        figures = work.check(duplicate_allowed=lambda runs: float(runs[-2][4]) < back_at + 5)
        # during the outage the producer was told so, clearly, and resubmitted with the key
        assert figures["submissions_refused"] > 0, "the producer never hit the outage"
        assert set(work.refusals) <= BROKER_ERRORS, work.refusal_messages


def wait_for_accepted(work: Workload, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(work.accepted) < count and time.monotonic() < deadline:
        time.sleep(0.05)
