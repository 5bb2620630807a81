"""Tenant limits without a server: the pure parts, and what a producer does when Redis is away.

The apps here use the embedded broker under ``tmp_path`` and a limits Redis on a closed port:
a job that reaches Redis fails at once, which proves which jobs never try.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import tasks_platform
from tasks_platform.application import PlatformCelery
from tasks_platform.errors import LimitsUnavailable
from tasks_platform.history import recorder
from tasks_platform.limits.admission import lease_seconds
from tasks_platform.limits.store import (
    LEASE_MARGIN,
    TenantLimits,
    entry,
    held_slot,
    interval,
    job_of,
    retry_delay,
    slot_header,
)
from tasks_platform.settings import Settings, TenantLimit

CLOSED_REDIS = "redis://127.0.0.1:1/0"
LIMITS = {
    "acme": {"demo.work": {"rate": 5, "per": 2}, "*": {"concurrency": 3}},
    "*": {"*": {"rate": 100}},
}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[PlatformCelery]:
    settings = Settings(data_dir=tmp_path, tenant_limits=LIMITS, limits_url=CLOSED_REDIS,
                        history_enabled=False)  # fmt: skip
    made = tasks_platform.create_app(settings, set_as_current=False)
    yield made
    recorder.close_all()
    made.close()


def queued_files(app: PlatformCelery) -> list[Path]:
    return list(app.settings.broker_folders()["queue"].iterdir())


@pytest.mark.parametrize(
    ("tenant", "job", "expected"),
    [
        ("acme", "demo.work", TenantLimit(rate=5, per=2)),  # the most specific entry
        ("acme", "email.send", TenantLimit(concurrency=3)),  # the tenant's default
        ("globex", "demo.work", TenantLimit(rate=100)),  # every tenant's default
        (None, "demo.work", TenantLimit(rate=100)),  # no tenant: only '*' entries
    ],
)
def test_the_most_specific_limit_applies(
    tenant: str | None, job: str, expected: TenantLimit
) -> None:
    settings = Settings(tenant_limits=LIMITS, limits_url=CLOSED_REDIS)
    assert settings.tenant_limit(tenant, job) == expected


def test_limits_count_per_tenant_and_job_type_even_under_a_shared_entry() -> None:
    limits = TenantLimits(Settings(tenant_limits=LIMITS, limits_url=CLOSED_REDIS,
                                   queue_prefix="p-"))  # fmt: skip
    keys = {limits.key("run", tenant, job) for tenant in ("a", "b", None)
            for job in ("x.one", "x.two")}  # fmt: skip
    assert len(keys) == 6
    assert limits.key("run", None, "x.one") == "p-tasks.limits.run//x.one"
    assert limits.key("leases", "a", "x.one") == "p-tasks.limits.leases/a/x.one"


def test_interval_is_the_period_divided_by_the_rate() -> None:
    assert interval(TenantLimit(rate=5, per=2)) == pytest.approx(0.4)
    assert interval(TenantLimit(concurrency=1)) == 0.0


def test_a_held_slot_counts_only_for_the_attempt_it_was_given_to() -> None:
    value = slot_header(2, 1_700_000_000.25)
    assert held_slot(value, 2) == pytest.approx(1_700_000_000.25)
    assert held_slot(value, 3) == 0.0  # a retry of that job spends a slot of its own
    for broken in (None, "", "x:y", "1700000000", 7):
        assert held_slot(broken, 0) == 0.0


def test_concurrency_retry_delay_has_up_to_half_of_it_again_as_jitter() -> None:
    delays = [retry_delay(1.0) for _ in range(200)]
    assert all(1.0 <= d <= 1.5 for d in delays)
    assert max(delays) - min(delays) > 0.2  # spread, not all the same moment


def test_every_deferral_is_an_entry_of_its_own_holding_the_signature() -> None:
    signature = {"task": "demo.work", "kwargs": {"label": "x"}, "options": {"task_id": "j1"}}
    first, second = entry(signature), entry(signature)
    assert first != second
    assert job_of(first) == job_of(second) == signature


def test_a_lease_outlives_the_jobs_hard_time_limit(app: PlatformCelery) -> None:
    task = app.tasks["demo.work"]
    given = SimpleNamespace(time_limits=(40, 30), task=task, app=app)
    default = SimpleNamespace(time_limits=(None, None), task=task, app=app)
    assert lease_seconds(given) == 40 + LEASE_MARGIN
    assert lease_seconds(default) == app.settings.time_limit + LEASE_MARGIN


def test_limited_job_is_refused_when_redis_is_unreachable_and_nothing_is_queued(
    app: PlatformCelery,
) -> None:
    work = app.tasks["demo.work"]
    with pytest.raises(LimitsUnavailable, match=r"cannot pace a job: .*127\.0\.0\.1:1/0"):
        work.apply_async(kwargs={"label": "x"}, tenant="acme")
    assert queued_files(app) == []


def test_jobs_without_a_rate_limit_never_call_redis(app: PlatformCelery, tmp_path: Path) -> None:
    """A concurrency-only limit is the worker's business: publishing needs no Redis; nor does
    a job no entry matches (another tenant, or no tenant where there is no '*' tenant)."""
    app.tasks["demo.noop"].apply_async(tenant="acme")  # acme's '*' entry: concurrency only
    assert len(queued_files(app)) == 1
    unlimited = tasks_platform.create_app(
        Settings(data_dir=tmp_path / "other", tenant_limits={"acme": LIMITS["acme"]},
                 limits_url=CLOSED_REDIS, history_enabled=False),
        set_as_current=False,
    )  # fmt: skip
    try:
        unlimited.tasks["demo.work"].apply_async(kwargs={"label": "y"}, tenant="globex")
        unlimited.tasks["demo.work"].apply_async(kwargs={"label": "z"})  # no tenant
        assert len(queued_files(unlimited)) == 2
    finally:
        unlimited.close()


def test_a_retry_or_a_delayed_job_is_left_to_the_worker(app: PlatformCelery) -> None:
    work: Any = app.tasks["demo.work"]
    work.apply_async(kwargs={"label": "later"}, tenant="acme", countdown=5)
    work.apply_async(kwargs={"label": "retry"}, tenant="acme", retries=1)
    assert len(queued_files(app)) == 2
