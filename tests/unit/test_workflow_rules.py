"""The rules a workflow's steps follow, checked before anything is queued (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import chain, chord, group
from pydantic import BaseModel

import tasks_platform
from tasks_platform.application import PlatformCelery
from tasks_platform.errors import ConfigurationError, DeclarationError, InvalidPayload, UnknownJob
from tasks_platform.jobs import job
from tasks_platform.settings import Settings
from tasks_platform.workflow import check_workflow, start_workflow


@pytest.fixture
def app(tmp_path: Path) -> PlatformCelery:
    return tasks_platform.create_app(Settings(data_dir=tmp_path), set_as_current=False)


def names(app: PlatformCelery, canvas: object) -> list[str]:
    return [task.name for _, task in check_workflow(canvas, app)]  # type: ignore[arg-type]


def test_a_step_receiving_a_result_is_declared_for_it_or_immutable(app: PlatformCelery) -> None:
    tally, work = app.tasks["demo.tally"], app.tasks["demo.work"]
    steps = names(app, chain(tally.s(add=1), tally.s(add=2), work.si(label="then")))
    assert steps == ["demo.tally", "demo.tally", "demo.work"]
    with pytest.raises(InvalidPayload, match=r"demo\.work would receive the previous step"):
        names(app, chain(tally.s(add=1), work.s(label="then")))


def test_a_bad_step_payload_is_refused_before_anything_is_queued(app: PlatformCelery) -> None:
    tally, work = app.tasks["demo.tally"], app.tasks["demo.work"]
    with pytest.raises(InvalidPayload, match="duration"):
        names(app, chain(tally.s(add=1), work.si(duration=-1)))
    with pytest.raises(InvalidPayload, match=r"step demo\.tally: add"):
        names(app, chain(tally.s(add=1), tally.s(add="many")))
    with pytest.raises(UnknownJob, match=r"no job type named 'celery\.backend_cleanup'"):
        names(app, chain(tally.s(add=1), app.signature("celery.backend_cleanup")))


def test_a_chord_needs_a_result_backend(app: PlatformCelery, tmp_path: Path) -> None:
    tally = app.tasks["demo.tally"]
    fan_in = chord([tally.si(add=n) for n in range(3)], tally.s())
    with pytest.raises(ConfigurationError, match="TASKS_RESULT_BACKEND"):
        start_workflow(fan_in, app=app)
    with pytest.raises(ConfigurationError, match="TASKS_RESULT_BACKEND"):
        names(app, chain(tally.s(add=1), group(tally.si(add=1), tally.si(add=2)), tally.s()))
    backed = tasks_platform.create_app(
        Settings(data_dir=tmp_path / "b", result_backend="redis://127.0.0.1:6379/1"),
        set_as_current=False,
    )
    assert names(backed, fan_in) == ["demo.tally"] * 4
    assert names(app, group(tally.si(add=1), tally.si(add=2))) == ["demo.tally"] * 2


def test_the_previous_result_goes_into_the_declared_field(app: PlatformCelery) -> None:
    tally = app.tasks["demo.tally"]
    assert tally.validate_payload((7,), {"add": 1}) == ((), {"add": 1, "previous": 7})
    assert tally.validate_payload(([1, 2],), {}) == ((), {"add": 0, "previous": [1, 2]})
    with pytest.raises(InvalidPayload, match="previous"):
        tally.validate_payload(("seven",), {})
    with pytest.raises(InvalidPayload, match=r"immutable signature \(\.si"):
        app.tasks["demo.work"].validate_payload(({"a": 1},), {})


def test_parent_result_must_name_a_schema_field() -> None:
    class Payload(BaseModel):
        value: int = 0

    with pytest.raises(DeclarationError, match="must name a field of its schema"):
        job("tests.receives_nothing", schema=Payload, parent_result="missing")(lambda p: p)
    with pytest.raises(DeclarationError, match="must name a field of its schema"):
        job("tests.receives_without_schema", parent_result="value")(lambda *a: a)


def test_a_workflow_tenant_must_be_valid(app: PlatformCelery) -> None:
    with pytest.raises(InvalidPayload, match="tenant"):
        start_workflow(app.tasks["demo.tally"].si(add=1), tenant="no spaces", app=app)
