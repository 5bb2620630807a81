"""Payload validation at submit time: refused payloads never reach a broker.

The apps here are never connected: either the embedded broker under ``tmp_path`` (never
started) or a Redis URL on a closed port, which proves a refusal happens before any
connection is attempted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tasks_platform
from tasks_platform.application import PlatformCelery
from tasks_platform.errors import InvalidPayload, UnknownJob
from tasks_platform.jobs.declaration import PlatformTask, job
from tasks_platform.settings import Settings
from tasks_platform.topology import Priority

CLOSED_REDIS = "redis://127.0.0.1:1/0"
CLOSED_AMQP = "amqp://guest:guest@127.0.0.1:1//"
LIMIT = 2048


@job("unittest.payload_free")
def payload_free(*args: Any, **kwargs: Any) -> None:
    """A job without a schema: any JSON payload, positional or keyword."""


def make_app(tmp_path: Path, **settings: Any) -> PlatformCelery:
    return tasks_platform.create_app(
        Settings(data_dir=tmp_path, max_payload_bytes=LIMIT, **settings), set_as_current=False
    )


@pytest.fixture
def app(tmp_path: Path) -> PlatformCelery:
    return make_app(tmp_path)


@pytest.fixture
def redis_app(tmp_path: Path) -> PlatformCelery:
    return make_app(tmp_path, broker_url=CLOSED_REDIS)


@pytest.fixture
def amqp_app(tmp_path: Path) -> PlatformCelery:
    return make_app(tmp_path, broker_url=CLOSED_AMQP)


def task_of(app: PlatformCelery, name: str) -> PlatformTask:
    task = app.tasks[name]
    assert isinstance(task, PlatformTask)
    return task


# -- schema jobs -----------------------------------------------------------------------------
def test_valid_payload_comes_back_json_ready_with_defaults_filled(app: PlatformCelery) -> None:
    args, kwargs = task_of(app, "demo.work").validate_payload((), {"label": "x", "fail_times": 2})
    assert args == ()
    assert kwargs == {
        "label": "x",
        "duration": 0.0,
        "fail_times": 2,
        "fail_permanently": False,
        "crash": False,
        "record_to": None,
        "progress_steps": 0,
        "usage": None,
        "effects_to": None,
    }
    assert json.loads(json.dumps(kwargs)) == kwargs


def test_valid_payload_is_coerced_to_the_schema_types(app: PlatformCelery) -> None:
    _, kwargs = task_of(app, "demo.work").validate_payload((), {"duration": "1.5"})
    assert kwargs["duration"] == 1.5


def test_report_cells_keep_their_json_types(app: PlatformCelery) -> None:
    payload = {"title": "t", "columns": ["a", "b", "c", "d"], "rows": [["x", 1, 2.5, None]]}
    _, kwargs = task_of(app, "reports.render").validate_payload((), payload)
    assert kwargs == payload


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"duration": "soon"}, "duration"),
        ({"fail_times": -1}, "fail_times"),
        ({"duration": 601}, "duration"),
        ({"label": "x" * 201}, "label"),
        ({"fail_permanently": "perhaps"}, "fail_permanently"),
    ],
    ids=repr,
)
def test_invalid_demo_payload_is_refused_naming_the_field(
    app: PlatformCelery, payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPayload, match=f"invalid payload for demo.work: .*{field}"):
        task_of(app, "demo.work").validate_payload((), payload)


def test_missing_required_fields_are_all_named(app: PlatformCelery) -> None:
    with pytest.raises(InvalidPayload) as caught:
        task_of(app, "reports.render").validate_payload((), {})
    for field in ("title", "columns", "rows"):
        assert f"{field}: Field required" in str(caught.value)


def test_nested_errors_name_their_location_and_are_summarised(app: PlatformCelery) -> None:
    payload = {"title": "t", "columns": ["a"], "rows": [[[1], [2], [3]]]}
    with pytest.raises(InvalidPayload, match=r"rows\.0\.0") as caught:
        task_of(app, "reports.render").validate_payload((), payload)
    assert "more" in str(caught.value), "only the first five errors are spelled out"


def test_positional_arguments_are_refused_for_schema_jobs(app: PlatformCelery) -> None:
    with pytest.raises(InvalidPayload, match="keyword arguments, got 1 positional"):
        task_of(app, "demo.work").validate_payload(({"label": "x"},), {})


def test_payload_over_the_size_limit_is_refused_with_the_limit(app: PlatformCelery) -> None:
    payload = {"title": "big", "columns": ["a"], "rows": [["x" * 100] for _ in range(30)]}
    with pytest.raises(InvalidPayload, match=f"the limit is {LIMIT} bytes") as caught:
        task_of(app, "reports.render").validate_payload((), payload)
    assert "TASKS_MAX_PAYLOAD_BYTES" in str(caught.value)


def test_payload_under_the_size_limit_is_accepted(app: PlatformCelery) -> None:
    payload = {"title": "small", "columns": ["a"], "rows": [["x" * 100] for _ in range(10)]}
    task_of(app, "reports.render").validate_payload((), payload)


# -- jobs without a schema -------------------------------------------------------------------
def test_schemaless_job_takes_any_json_payload(app: PlatformCelery) -> None:
    task = task_of(app, "unittest.payload_free")
    assert task.validate_payload([1, "two"], {"three": [3]}) == ((1, "two"), {"three": [3]})


@pytest.mark.parametrize(
    "value", [object(), {1, 2}, b"bytes", Path("/tmp")], ids=["object", "set", "bytes", "path"]
)
def test_non_json_value_is_refused(app: PlatformCelery, value: object) -> None:
    with pytest.raises(InvalidPayload, match=r"payload of unittest\.payload_free is not JSON"):
        task_of(app, "unittest.payload_free").validate_payload((), {"value": value})


def test_non_json_value_in_a_schema_job_is_refused(app: PlatformCelery) -> None:
    with pytest.raises(InvalidPayload, match="label"):
        task_of(app, "demo.work").validate_payload((), {"label": object()})


def test_size_limit_applies_to_schemaless_jobs(app: PlatformCelery) -> None:
    with pytest.raises(InvalidPayload, match=f"limit is {LIMIT} bytes"):
        task_of(app, "unittest.payload_free").validate_payload(("x" * LIMIT,), {})


# -- submit() --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["no.such", "celery.chord", "demo"])
def test_submit_of_an_undeclared_job_lists_the_declared_ones(
    app: PlatformCelery, name: str
) -> None:
    with pytest.raises(UnknownJob, match=f"no job type named {name!r}") as caught:
        tasks_platform.submit(name, {}, app=app)
    message = str(caught.value)
    for declared in ("demo.work", "reports.render", "unittest.payload_free"):
        assert declared in message
    assert "celery.chord" not in message.split("declared:")[1]


def test_submit_refuses_an_invalid_payload_before_connecting(redis_app: PlatformCelery) -> None:
    # the broker URL points at a closed port: any connection attempt would fail differently
    with pytest.raises(InvalidPayload, match="bogus"):
        tasks_platform.submit("demo.work", {"bogus": 1}, app=redis_app)


def test_submit_refuses_an_unknown_priority_before_connecting(redis_app: PlatformCelery) -> None:
    with pytest.raises(InvalidPayload, match="unknown priority 'urgent'"):
        tasks_platform.submit("demo.work", {}, priority="urgent", app=redis_app)


def test_delay_validates_like_submit(redis_app: PlatformCelery) -> None:
    with pytest.raises(InvalidPayload, match="fail_times"):
        task_of(redis_app, "demo.work").delay(fail_times="many")


# -- priorities ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("priority", "redis", "amqp"),
    [
        ("critical", 0, 3),
        ("high", 3, 2),
        ("normal", 6, 1),
        ("low", 9, 0),
        (Priority.HIGH, 3, 2),
        (None, 6, 1),  # the declaration's priority: demo.work is normal
        (0, 0, 0),  # already a broker number: passed through
        (7, 7, 7),
    ],
)
def test_priority_names_map_to_the_broker_numbers(
    redis_app: PlatformCelery,
    amqp_app: PlatformCelery,
    priority: object,
    redis: int,
    amqp: int,
) -> None:
    assert task_of(redis_app, "demo.work")._broker_priority(priority) == redis
    assert task_of(amqp_app, "demo.work")._broker_priority(priority) == amqp


@pytest.mark.parametrize("priority", ["critical", "low", None])
def test_embedded_broker_has_no_priorities(app: PlatformCelery, priority: str | None) -> None:
    assert task_of(app, "demo.work")._broker_priority(priority) is None


@pytest.mark.parametrize("priority", ["urgent", "CRITICAL", ""])
def test_unknown_priority_name_is_an_invalid_payload(
    redis_app: PlatformCelery, priority: str
) -> None:
    with pytest.raises(InvalidPayload, match="critical, high, normal, low"):
        task_of(redis_app, "demo.work")._broker_priority(priority)


@pytest.mark.parametrize("priority", [True, 1.5, ["high"]], ids=repr)
def test_priority_of_another_type_is_an_invalid_payload(
    redis_app: PlatformCelery, priority: object
) -> None:
    with pytest.raises(InvalidPayload, match="priority must be a priority name"):
        task_of(redis_app, "demo.work")._broker_priority(priority)
