"""Three worker hosts (network namespaces) share the queues; one loses its link mid-run.

Each host runs a real ``celery -A tasks_platform worker`` in its own namespace and reaches
the broker and the PostgreSQL history on this machine through a forwarded port on its link.
While the victim host runs jobs, its link goes down. The jobs it held come back and run on
the other hosts (Redis: after the visibility timeout; RabbitMQ: once the broker has missed the
victim's heartbeats and closed its connection). On RabbitMQ every job completes while the
victim is still cut off. On Redis one job may be in flight to the victim (BRPOP has taken it
off the list, the victim has not received it) and only arrives once the link is back.

Then the link comes back, as after any partition, so that the victim's last history
transitions (buffered while its database was out of reach) are written. Every job must end
``succeeded``, in one history row; at least once: only jobs the victim started ran twice.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy
from conftest import SHORT_VISIBILITY_REDIS_URL, Platform, in_ci, wait_for
from control_helpers import control_platform
from netns import Host, hosts, namespaces_unavailable
from sqlalchemy.orm import Session
from tcp_proxy import TcpProxy

from tasks_platform.history.models import Job, JobEvent

JOBS = 240
DURATION = 0.25
CONCURRENCY = 8
#: Redis hands out an unacknowledged job again after this many seconds
VISIBILITY = 6
#: RabbitMQ closes a connection after about two missed heartbeats
HEARTBEAT = 2
OVERRIDES: dict[str, dict[str, Any]] = {
    "redis": {"broker_url": SHORT_VISIBILITY_REDIS_URL, "visibility_timeout": VISIBILITY,
              "backoff_max": 4, "redis_restore_interval": 1},
    "rabbitmq": {"broker_heartbeat": HEARTBEAT},
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _namespaces() -> None:
    reason = namespaces_unavailable()
    if reason is None:
        return
    message = f"the multi-host test needs network namespaces: {reason}"
    if in_ci():
        pytest.fail(f"{message}; under CI this is a failure, not a skip")
    pytest.skip(message)


def forwarded(url: str, host: Host, stack: ExitStack) -> str:
    """``url`` as seen from ``host``: its server through a port forwarded on the host's link."""
    parts = urlsplit(url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 0), host=host.root_address)
    stack.callback(proxy.cut)
    proxy.start()
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@" if credentials else ""
    return parts._replace(netloc=f"{netloc}{host.root_address}:{proxy.port}").geturl()


@contextmanager
def fleet(platform: Platform, count: int) -> Iterator[list[tuple[Host, Any]]]:
    """``count`` hosts, each running one worker; stopped and deleted afterwards."""
    settings = platform.settings
    with hosts(count) as machines, ExitStack() as stack:
        started = []
        for host in machines:
            env = {"TASKS_BROKER_URL": forwarded(settings.broker_url, host, stack),
                   "TASKS_DATABASE_URL": forwarded(settings.database_url, host, stack)}  # fmt: skip
            launcher = host.launcher(sys.executable, "-m", "celery")
            worker = platform.worker(start=False, concurrency=CONCURRENCY, pool="threads",
                                     extra_env=env, launcher=launcher)  # fmt: skip
            worker.start(wait=False)
            started.append((host, worker))
        try:
            for _, worker in started:
                worker.wait_ready(platform.app)
            yield started
        finally:
            for _, worker in started:
                worker.kill()  # the partitioned one could not shut down warm anyway


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_jobs_of_a_host_that_loses_its_link_complete_on_the_others(
    broker: str, tmp_path: Path
) -> None:
    with control_platform(broker, tmp_path, **OVERRIDES[broker]) as platform, \
         fleet(platform, 3) as workers:  # fmt: skip
        [(victim_host, victim), *_] = workers
        runs = platform.runs()
        task = platform.task("demo.work")
        ids = [task.delay(label=f"j{n}", duration=DURATION, record_to=str(runs.path)).id
               for n in range(JOBS)]  # fmt: skip

        def on_victim() -> list[list[str]]:
            return [r for r in runs.starts() if int(r[2]) == victim.pid]

        wait_for(lambda: len(on_victim()) >= CONCURRENCY, 60, what="the victim to be busy")
        victim_host.cut()
        assert len(runs.dones()) < JOBS, "the link was cut after the run"
        others = {worker.pid for _, worker in workers[1:]}

        def rerun() -> set[str]:
            """Jobs that the victim started (it goes on with what it holds) and another host too."""
            held = {r[0] for r in on_victim()}
            return {r[0] for r in runs.starts() if int(r[2]) in others} & held

        wait_for(rerun, 60, what="a job the cut host held to run on another host")
        if broker == "rabbitmq":
            # the broker requeued everything the victim had not acknowledged: nothing is missing
            wait_for(lambda: len({r[0] for r in runs.dones()}) == JOBS, 60,
                     what="every job to complete while the host is cut off")  # fmt: skip
        # the victim's last history transitions wait in its buffer until its link is back
        victim_host.heal()
        try:
            wait_for(lambda: succeeded(platform, ids) == JOBS, 90,
                     what=f"all {JOBS} jobs succeeded in the history")  # fmt: skip
        except AssertionError as exc:
            missing = describe_missing(platform, ids, runs, victim.pid)
            raise AssertionError(f"{exc}; {missing}") from None

        rows = history(platform, ids)
        assert len(rows) == JOBS  # one row per job
        assert {row.state for row in rows} == {"succeeded"}
        assert all(row.finished_at is not None for row in rows)
        assert not failures(platform, ids)
        assert {r[0] for r in runs.dones()} == {f"j{n}" for n in range(JOBS)}
        # at least once: only jobs that the cut host started ran twice
        starts = [r[0] for r in runs.starts()]
        assert {label for label in starts if starts.count(label) > 1} <= {r[0] for r in on_victim()}


def describe_missing(platform: Platform, ids: list[str], runs: Any, victim: int) -> str:
    """The jobs not succeeded: their state and where they started (for the failure message)."""
    states = {row.id: row.state for row in history(platform, ids)}
    labels = {job_id: f"j{n}" for n, job_id in enumerate(ids)}
    missing = [job_id for job_id in ids if states.get(job_id) != "succeeded"]
    starts = runs.starts()
    details = []
    for job_id in missing[:10]:
        label = labels[job_id]
        where = ["victim" if int(r[2]) == victim else r[2] for r in starts if r[0] == label]
        details.append(f"{label} {states.get(job_id, 'no row')}, started on {where or 'none'}")
    return f"{len(missing)} not succeeded: " + "; ".join(details)


def history(platform: Platform, ids: list[str]) -> list[Job]:
    with Session(platform.history) as session:
        return list(session.scalars(sqlalchemy.select(Job).where(Job.id.in_(ids))).all())


def succeeded(platform: Platform, ids: list[str]) -> int:
    query = sqlalchemy.select(sqlalchemy.func.count()).where(
        Job.id.in_(ids), Job.state == "succeeded"
    )
    with Session(platform.history) as session:
        return int(session.scalar(query) or 0)


def failures(platform: Platform, ids: list[str]) -> list[tuple[str, str]]:
    query = sqlalchemy.select(JobEvent.job_id, JobEvent.state).where(
        JobEvent.job_id.in_(ids), JobEvent.state.in_(["failed", "dead", "retrying"])
    )
    with Session(platform.history) as session:
        return [(row.job_id, row.state) for row in session.execute(query)]
