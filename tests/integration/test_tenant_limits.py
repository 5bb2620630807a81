"""Tenant limits on real brokers and real workers, with the limits in Redis.

One platform per broker (two worker processes) serves the concurrency, fairness and outage
tests; its limits live in Redis through ``limits_url``, behind a proxy that the outage test
cuts. The Redis scripts themselves are checked against Redis directly.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import redis
import sqlalchemy
from conftest import REDIS_URL, Platform, Runs, require_service, wait_for
from control_helpers import control_platform, job_row
from sqlalchemy.orm import Session
from tcp_proxy import TcpProxy

from tasks_platform.history.models import Job, JobEvent
from tasks_platform.limits.store import TOLERANCE, TenantLimits, entry, job_of
from tasks_platform.settings import Settings, TenantLimit

RATE = 20  # jobs a second for the flooding tenant
FLOOD = 500  # its jobs, queued at once: 25 s of work at its rate
B_JOBS = 80  # jobs of the other tenant, in each phase
B_SPACING = 0.025  # seconds between two of them
LIMITS = {
    "flood": {"demo.work": {"rate": RATE}},
    "capped": {"*": {"concurrency": 2}},
}


class Limited(NamedTuple):
    platform: Platform
    proxy: TcpProxy  #: between the platform and the Redis keeping its limits


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def limited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Limited]:  # fmt: skip
    """A platform with tenant limits and two worker processes, shared by a module's tests.

    Its limits live in Redis through a proxy (a test cuts it); on Redis the broker does not.
    """
    require_service("redis", REDIS_URL)
    tmp_path = tmp_path_factory.mktemp(f"limits-{request.param}")
    redis_url = urlsplit(REDIS_URL)
    proxy = TcpProxy((redis_url.hostname or "127.0.0.1", redis_url.port or 6379)).start()
    overrides: dict[str, Any] = {
        "tenant_limits": LIMITS,
        "limits_url": f"redis://127.0.0.1:{proxy.port}{redis_url.path}",
        "limits_defer_delay": 0.2,
        "history_flush_interval": 0.2,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("TASKS_")]:
            patch.delenv(name)
        with control_platform(request.param, tmp_path, **overrides) as platform:
            workers = [platform.worker(pool="threads", concurrency=4, start=False)
                       for _ in range(2)]  # fmt: skip
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.wait_ready(platform.app)
            try:
                yield Limited(platform, proxy)
            finally:
                clear_limits(platform.settings)
                proxy.cut()


# -- the Redis scripts -------------------------------------------------------------------------
def test_pacing_spaces_a_tenants_slots_by_its_interval_and_stores_the_later_jobs() -> None:
    with store() as limits:
        limit = TenantLimit(rate=10)
        slots = [limits.pace("acme", "demo.work", limit, f"job-{i}") for i in range(4)]
        other = limits.pace("globex", "demo.work", limit, "other")  # a tenant of its own

        assert slots[0] is None  # due now: published at once
        assert other is None
        later = [slot for slot in slots[1:] if slot is not None]
        assert [b - a for a, b in itertools.pairwise(later)] == pytest.approx([0.1, 0.1], abs=1e-5)
        assert limits.deferred() == 3
        assert limits.take_due(10) == []  # none due yet


def test_mover_claims_due_jobs_once_and_a_job_deferred_again_meanwhile_is_kept() -> None:
    with store() as limits:
        job = {"task": "demo.work", "options": {"task_id": "j1"}}
        early, late = entry(job), entry({**job, "options": {"task_id": "j2"}})
        limits.defer(early, time.time() - 1)
        limits.defer(late, time.time() + 60)

        assert limits.take_due(10) == [early]
        assert limits.take_due(10) == []  # claimed: another mover does not publish it too
        limits.put_back([early], 0)  # its publish failed
        assert limits.take_due(10) == [early]
        again = entry(job)  # published, and deferred again before the mover forgot it
        limits.defer(again, time.time() - 1)
        limits.forget([early])

        assert limits.take_due(10) == [again]
        assert job_of(again) == job
        assert limits.deferred() == 2


def test_concurrency_lease_is_idempotent_per_job_refuses_when_full_and_expires() -> None:
    with store() as limits:
        limit = TenantLimit(concurrency=2)

        def admit(job_id: str, lease: float = 30) -> str | None:
            decision = limits.admit("acme", "demo.work", limit, job_id=job_id, lease_seconds=lease)
            return decision.reason

        assert [admit("a", lease=0.3), admit("b"), admit("a", lease=0.3)] == [None, None, None]
        assert admit("c") == "concurrency"
        limits.release("acme", "demo.work", "b")
        assert admit("c") is None
        assert admit("d") == "concurrency"
        time.sleep(0.4)  # a's lease ran out: its worker died
        assert admit("d") is None


def test_execution_rate_defers_to_a_slot_that_the_job_then_holds() -> None:
    with store() as limits:
        limit = TenantLimit(rate=4)  # a slot every 0.25 s; TOLERANCE adds one of burst

        def admit(job_id: str, held: float = 0.0) -> Any:
            return limits.admit("acme", "demo.work", limit, job_id=job_id, lease_seconds=30,
                                held=held)  # fmt: skip

        first, second, third = admit("a"), admit("b"), admit("c")
        assert (first.admitted, second.admitted, third.reason) == (True, True, "rate")
        assert third.until - third.now > TOLERANCE
        fourth = admit("d")
        assert fourth.until - third.until == pytest.approx(0.25, abs=1e-5)
        time.sleep(max(third.until - time.time(), 0))
        assert admit("c", held=third.until).admitted  # its own slot: no second one spent
        assert admit("e").reason == "rate"  # while a newcomer still waits behind d


# -- concurrency on real workers ---------------------------------------------------------------
def test_concurrency_limit_holds_across_workers_and_deferrals_cost_no_attempt(
    limited: Limited,
) -> None:
    platform = limited.platform
    runs = platform.runs("capped")
    ids = [submit(platform, f"c{i}", runs, tenant="capped", duration=0.3) for i in range(12)]

    wait_for(lambda: all_succeeded(platform, ids), 60, what="every capped job to succeed")

    spans = intervals(runs)
    assert len(spans) == 12  # every job ran, once
    assert max_overlap(spans) == 2  # 8 threads were free: only the limit held them back
    rows = [job_row(platform, job_id) for job_id in ids]
    assert {(row.attempts, row.state) for row in rows if row} == {(1, "succeeded")}
    reasons = deferral_reasons(platform, ids)
    assert reasons
    assert set(reasons) == {"concurrency"}
    assert len(runs.starts()) == 12  # a deferral never started the job


def test_jobs_that_fail_or_retry_give_their_lease_back(limited: Limited) -> None:
    platform = limited.platform
    runs = platform.runs("failing")
    doomed = [submit(platform, f"dead{i}", runs, tenant="capped", fail_permanently=True)
              for i in range(2)]  # fmt: skip
    flaky = submit(platform, "flaky", runs, tenant="capped", fail_times=1)
    wait_for(lambda: all_in(platform, doomed, "dead") and all_in(platform, [flaky], "succeeded"),
             30, what="the failing jobs to end")  # fmt: skip

    after = [submit(platform, f"after{i}", runs, tenant="capped", duration=0.5) for i in range(2)]

    wait_for(lambda: all_in(platform, after, "succeeded"), 20, what="the jobs after them")
    spans = [span for span in intervals(runs) if span[2].startswith("after")]
    assert max_overlap(spans) == 2  # both leases were free again: none leaked


# -- fairness -----------------------------------------------------------------------------------
def test_flooded_tenant_runs_at_its_rate_while_others_keep_flowing(limited: Limited) -> None:
    platform = limited.platform
    b_quiet, b_busy, flood = platform.runs("b-quiet"), platform.runs("b-busy"), platform.runs("a")
    unloaded = b_waits(platform, b_quiet)

    began = time.time()
    a_ids = [submit(platform, f"a{i}", flood, tenant="flood") for i in range(FLOOD)]
    paced = time.time() - began
    loaded = b_waits(platform, b_busy)

    def a_starts() -> list[float]:
        return sorted(float(line[4]) for line in flood.starts())

    wait_for(lambda: (s := a_starts()) and s[-1] > s[0] + 5.0, 15, what="5 s of A's jobs")
    starts = a_starts()
    window = (starts[0] + 1.0, starts[0] + 5.0)  # from its first second on
    rate = sum(window[0] <= t < window[1] for t in starts) / (window[1] - window[0])
    p95_unloaded, p95_loaded = p95(unloaded), p95(loaded)
    print(f"\nA: {FLOOD} jobs paced in {paced:.2f} s, rate {rate:.2f}/s (limit {RATE}); "
          f"B p95 wait unloaded {p95_unloaded * 1000:.1f} ms, under the flood "
          f"{p95_loaded * 1000:.1f} ms")  # fmt: skip
    assert abs(rate - RATE) <= 0.1 * RATE, f"A ran at {rate:.2f}/s, not {RATE}/s"
    assert len(starts) < FLOOD / 2  # A still had a backlog: B did not wait for it to drain
    assert p95_loaded <= max(2 * p95_unloaded, p95_unloaded + 0.05), (
        f"B's p95 wait went from {p95_unloaded:.3f} s to {p95_loaded:.3f} s under the flood"
    )
    last = job_row(platform, a_ids[-1])
    assert last is not None
    assert (last.state, last.tenant) == ("queued", "flood")  # waiting for its slot
    assert deferral_reasons(platform, a_ids[-1:]) == ["rate"]


# -- Redis outage -------------------------------------------------------------------------------
def test_worker_keeps_a_limited_job_while_redis_is_unreachable_and_runs_it_after(
    limited: Limited,
) -> None:
    platform, proxy = limited
    runs = platform.runs("kept")
    proxy.cut()
    try:
        job_id = submit(platform, "kept", runs, tenant="capped")  # concurrency only: no pacing

        def put_back() -> int:
            return platform.logs().count(f"[{job_id}] not started; it goes back to its queue")

        wait_for(lambda: put_back() >= 2, 20, what="the worker to put the job back twice")
        assert runs.starts() == []  # not run unlimited
    finally:
        proxy.start()

    wait_for(lambda: all_succeeded(platform, [job_id]), 30, what="the kept job")
    row = job_row(platform, job_id)
    assert row is not None
    assert row.attempts == 1
    assert len(runs.starts("kept")) == 1


# -- helpers ------------------------------------------------------------------------------------
@contextmanager
def store() -> Iterator[TenantLimits]:
    """A :class:`TenantLimits` under a fresh prefix, its keys deleted afterwards."""
    require_service("redis", REDIS_URL)
    prefix = f"t{uuid.uuid4().hex[:10]}-"
    settings = Settings(broker_url=REDIS_URL, queue_prefix=prefix, tenant_limits=LIMITS)
    limits = TenantLimits(settings)
    try:
        yield limits
    finally:
        clear_limits(settings)
        limits.close()


def clear_limits(settings: Settings) -> None:
    """Delete the platform's keys (directly, not through a proxy that may be cut)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{settings.queue_prefix}tasks.limits.*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def submit(platform: Platform, label: str, runs: Runs, *, tenant: str, **payload: Any) -> str:
    task = platform.task("demo.work")
    return str(task.apply_async(kwargs={"label": label, "record_to": str(runs.path), **payload},
                                tenant=tenant).id)  # fmt: skip


def all_succeeded(platform: Platform, ids: list[str]) -> bool:
    return all_in(platform, ids, "succeeded")


def all_in(platform: Platform, ids: list[str], state: str) -> bool:
    with Session(platform.history) as session:
        query = sqlalchemy.select(sqlalchemy.func.count()).where(
            Job.id.in_(ids), Job.state == state
        )
        return session.scalar(query) == len(ids)


def deferral_reasons(platform: Platform, ids: list[str]) -> list[str]:
    """The reasons of the deferral events of ``ids`` (history)."""
    with Session(platform.history) as session:
        query = sqlalchemy.select(JobEvent.detail).where(JobEvent.job_id.in_(ids))
        details = session.scalars(query)
        return [d["reason"] for d in details if d and "deferred_until" in d]


def intervals(runs: Runs) -> list[tuple[float, float, str]]:
    """(start, end, label) of every run that succeeded."""
    starts = {(line[0], line[1]): float(line[4]) for line in runs.starts()}
    return [(starts[line[0], line[1]], float(line[4]), line[0]) for line in runs.dones()]


def max_overlap(spans: list[tuple[float, float, str]]) -> int:
    edges = sorted([(span[0], 1) for span in spans] + [(span[1], -1) for span in spans])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def b_waits(platform: Platform, runs: Runs) -> list[float]:
    """Submit ``B_JOBS`` jobs of an unlimited tenant, spaced out; the seconds each waited."""
    submitted: dict[str, float] = {}
    for i in range(B_JOBS):
        label = f"b{i}"
        submitted[label] = time.time()
        submit(platform, label, runs, tenant="b")
        time.sleep(max(submitted[label] + B_SPACING - time.time(), 0))
    wait_for(lambda: len(runs.starts()) == B_JOBS, 30, what="every B job to start")
    return [float(line[4]) - submitted[line[0]] for line in runs.starts()]


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]
