"""The @job declaration: everything wrong with a declaration fails at import time.

Declarations are global (one name, one body per process), so every test declares its own
``unittest.declaration_<n>`` name.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Task
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from tasks_platform.application import create_app
from tasks_platform.errors import DeclarationError, PublishNotConfirmed
from tasks_platform.jobs.declaration import PlatformTask, job
from tasks_platform.jobs.retry import RetryPolicy
from tasks_platform.settings import Settings
from tasks_platform.topology import QUEUES, Priority

_numbers = itertools.count(1)


def unique_name() -> str:
    return f"unittest.declaration_{next(_numbers)}"


def body(**payload: Any) -> dict[str, Any]:
    return payload


def other_body(**payload: Any) -> dict[str, Any]:
    return payload


class Payload(BaseModel):
    value: int


@dataclass
class NotAModel:
    value: int


def test_a_valid_declaration_becomes_a_platform_task(tmp_path: Path) -> None:
    name = unique_name()
    policy = RetryPolicy(max_retries=2, transient=(OSError,))
    declared = job(
        name,
        queue="reports",
        schema=Payload,
        retry=policy,
        priority="high",
        soft_time_limit=10,
        time_limit=20,
    )(body)
    task = create_app(Settings(data_dir=tmp_path), set_as_current=False).tasks[name]
    assert isinstance(task, PlatformTask)
    assert declared.name == task.name == name
    assert task.family == "reports"
    assert task.schema is Payload
    assert task.retry_policy is policy
    assert task.platform_priority is Priority.HIGH
    assert (task.soft_time_limit, task.time_limit) == (10, 20)
    assert task.takes_context is False


def test_declaration_defaults(tmp_path: Path) -> None:
    name = unique_name()
    job(name)(body)
    task = create_app(Settings(data_dir=tmp_path), set_as_current=False).tasks[name]
    assert task.family == "default"
    assert task.schema is None
    assert task.retry_policy == RetryPolicy()
    assert task.platform_priority is Priority.NORMAL


@pytest.mark.parametrize("queue", ["billing", "Reports", "reports.dead", ""])
def test_unknown_queue_is_refused_naming_it_and_listing_the_queues(queue: str) -> None:
    with pytest.raises(DeclarationError, match=f"unknown queue {queue!r}") as caught:
        job(unique_name(), queue=queue)
    assert f"declared queues: {', '.join(QUEUES)}" in str(caught.value)


@pytest.mark.parametrize(
    "name",
    [
        "Reports.Render",
        "reports.Render",
        "render",
        "a..b",
        ".a.b",
        "a.b.",
        "1reports.render",
        "reports.1render",
        "reports-x.render",
        "reports render",
        "",
    ],
)
def test_badly_formed_job_name_is_refused(name: str) -> None:
    with pytest.raises(DeclarationError, match="dotted lowercase words"):
        job(name)


@pytest.mark.parametrize("name", ["a.b", "reports.render_v2", "ai.text.generate_9"])
def test_well_formed_job_names_are_accepted(name: str) -> None:
    suffix = next(_numbers)
    job(f"{name}_{suffix}", queue="default")  # refused names raise here already


@pytest.mark.parametrize("schema", [dict, NotAModel, Payload(value=1), "Payload"], ids=repr)
def test_schema_that_is_not_a_pydantic_model_class_is_refused(schema: object) -> None:
    with pytest.raises(DeclarationError, match="pydantic model class"):
        job(unique_name(), schema=schema)  # type: ignore[arg-type]


@pytest.mark.parametrize("retry", [{"max_retries": 3}, 3, RetryPolicy], ids=repr)
def test_retry_that_is_not_a_retry_policy_is_refused(retry: object) -> None:
    with pytest.raises(DeclarationError, match="retry must be a RetryPolicy"):
        job(unique_name(), retry=retry)  # type: ignore[arg-type]


@pytest.mark.parametrize("priority", ["urgent", "HIGH", ""])
def test_unknown_priority_is_refused_listing_the_names(priority: str) -> None:
    with pytest.raises(DeclarationError, match="critical, high, normal, low"):
        job(unique_name(), priority=priority)


@pytest.mark.parametrize("priority", [Priority.CRITICAL, "low"])
def test_priority_given_as_member_or_name_is_accepted(
    priority: Priority | str, tmp_path: Path
) -> None:
    name = unique_name()
    job(name, priority=priority)(body)
    task = create_app(Settings(data_dir=tmp_path), set_as_current=False).tasks[name]
    assert task.platform_priority == priority


@pytest.mark.parametrize(("soft", "hard"), [(60, 60), (60, 30), (0.5, 0.1)])
def test_time_limit_not_above_soft_time_limit_is_refused(soft: float, hard: float) -> None:
    with pytest.raises(DeclarationError, match="time_limit must exceed soft_time_limit"):
        job(unique_name(), soft_time_limit=soft, time_limit=hard)


def test_declaring_a_name_twice_from_another_function_is_refused() -> None:
    name = unique_name()
    job(name)(body)
    with pytest.raises(DeclarationError, match="declared twice") as caught:
        job(name)(other_body)
    assert "body" in str(caught.value)
    assert "other_body" in str(caught.value)


def test_a_refused_declaration_does_not_reserve_the_name(tmp_path: Path) -> None:
    name = unique_name()
    with pytest.raises(DeclarationError):
        job(name, queue="billing")(body)
    job(name, queue="email")(other_body)
    task = create_app(Settings(data_dir=tmp_path), set_as_current=False).tasks[name]
    assert task.family == "email"


def test_unknown_keyword_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'queues'"):
        job(unique_name(), queues="default")  # type: ignore[call-arg]


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError, match="positional argument"):
        job(unique_name(), "default")  # type: ignore[misc]


def test_a_callers_publish_errback_is_called_and_its_failed_try_still_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu calls the retry policy's errback before each new try. A caller's own errback is
    called, and the try it saw still counts: a connection lost mid-publish makes the job
    *maybe* queued, even though the last try was refused a connection."""
    name = unique_name()
    job(name)(body)
    task = create_app(Settings(data_dir=tmp_path), set_as_current=False).tasks[name]

    def kombu_retrying(self: Any, *args: Any, **options: Any) -> Any:
        options["retry_policy"]["errback"](ConnectionResetError("lost mid-publish"), 0.0)
        refused = ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")
        raise OperationalError("connection refused") from refused

    monkeypatch.setattr(Task, "apply_async", kombu_retrying)
    seen: list[BaseException] = []
    with pytest.raises(PublishNotConfirmed, match="lost while publishing"):
        task.apply_async(retry_policy={"errback": lambda exc, interval: seen.append(exc)})
    assert [type(exc) for exc in seen] == [ConnectionResetError]
