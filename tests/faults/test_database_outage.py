"""The history database crashes mid-run and comes back: jobs keep running, history catches up.

The jobs are submitted with idempotency keys (their rows are written before they are
published), then PostgreSQL is SIGKILLed while the worker runs them. Every job must finish
while it is down (the recorder buffers, and journals what does not fit), and once it is back
every row must be brought to ``succeeded``. No broker fault: no job may run twice.
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import wait_for

from faults.scenario import Workload, fault_platform
from faults.servers import PrivateServer


def test_history_database_crash_mid_run_jobs_finish_and_history_catches_up(
    tmp_path: Path, private_postgres: PrivateServer
) -> None:
    with fault_platform("redis", tmp_path, database=private_postgres.url) as platform:
        platform.worker(concurrency=2)
        work = Workload(platform, "database-outage", jobs=200, duration=0.05)
        work.submit_all()
        wait_for(lambda: work.done() >= 20, 60, what="the first jobs to finish")

        private_postgres.crash()
        down_at = time.monotonic()
        # a producer that needs the database (an idempotency key) is refused, nothing queued
        assert not work.submit("database-outage-during"), "accepted with the database down"
        wait_for(lambda: work.done() >= work.jobs, 90, what="every job to finish, database down")
        finished_while_down = work.done() - 20
        private_postgres.start()
        work.faults.append(f"postgres SIGKILLed, restarted after {time.monotonic() - down_at:.1f}s")

        work.wait_finished(timeout=60, history_timeout=60)
        figures = work.check(duplicate_allowed=lambda runs: False)
        assert finished_while_down > 0, figures
        assert work.refusals == {"tasks_platform.errors.HistoryUnavailable": 1}, figures
