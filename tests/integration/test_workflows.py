"""Workflows (chain, group + chord) of platform jobs on real brokers, a real worker, a Redis
result backend (chords gather their group's results there) and a PostgreSQL history.

One platform per broker runs three workflows at once: a chain that succeeds, a fan-out of 5
with a fan-in callback, and a chain whose middle step fails for good. The workflow view, the
``tasks-platform workflow`` command and the history rows are checked for each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from celery import chain, chord
from conftest import REDIS_URL, Platform, wait_for
from control_helpers import control_platform, wait_state
from sqlalchemy.orm import Session

from tasks_platform.history.models import Job
from tasks_platform.history.workflows import Workflow, find_workflow
from tasks_platform.process import settings_env
from tasks_platform.workflow import start_workflow

CLI = [sys.executable, "-m", "tasks_platform"]


def view(platform: Platform, root_id: str) -> Workflow | None:
    with Session(platform.history) as session:
        return find_workflow(session, root_id)


def settled(platform: Platform, root_id: str, state: str, steps: int) -> Workflow:
    """The workflow once it is in ``state`` with ``steps`` steps recorded."""

    def reached() -> Workflow | None:
        found = view(platform, root_id)
        ok = found is not None and found.state == state and found.step_count == steps
        return found if ok else None

    try:
        return wait_for(reached, 60, what=f"workflow {root_id} {state} with {steps} steps")  # type: ignore[no-any-return]
    except AssertionError as exc:
        found = view(platform, root_id)
        seen = None if found is None else [(s.name, s.state) for s in found.steps]
        raise AssertionError(f"{exc}; it has {seen}") from None


def cli(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    env |= settings_env(platform.settings)
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_chains_and_chords_run_and_their_workflow_says_how_they_went(
    broker: str, tmp_path: Path
) -> None:
    with control_platform(broker, tmp_path, result_backend=REDIS_URL) as platform:
        tally, work, runs = platform.task("demo.tally"), platform.task("demo.work"), platform.runs()
        straight = start_workflow(
            chain(tally.s(add=1), tally.s(add=2), tally.s(add=3)), tenant="acme", app=platform.app
        )
        fan = start_workflow(
            chord([tally.si(add=n) for n in range(1, 6)], tally.s(add=100)), app=platform.app
        )
        broken = start_workflow(
            chain(tally.s(add=1),
                  work.si(label="boom", fail_permanently=True, record_to=str(runs.path)),
                  tally.s(add=1)),
            app=platform.app,
        )  # fmt: skip
        platform.worker(pool="threads", concurrency=4)

        # a chain of three: each step got the one before's result, all under one root id
        done = settled(platform, straight, "succeeded", 3)
        assert [(s.name, s.result) for s in done.steps] == [("demo.tally", n) for n in (1, 3, 6)]
        assert {s.root_id for s in done.steps} == {straight}
        assert [s.parent_id for s in done.steps[1:]] == [s.id for s in done.steps[:2]]
        assert done.tenants == frozenset({"acme"})
        assert done.failing == []

        # fan-out 5, fan-in 1: the callback got every result of the group
        gathered = settled(platform, fan, "succeeded", 6)
        members = [s for s in gathered.steps if s.kwargs and s.kwargs.get("previous") is None]
        callback = [s for s in gathered.steps if s not in members]
        assert sorted(s.result for s in members) == [1, 2, 3, 4, 5]
        assert len({s.group_id for s in members}) == 1
        assert members[0].group_id is not None
        assert [(c.kwargs or {}).get("previous") for c in callback] == [[1, 2, 3, 4, 5]]
        assert [c.result for c in callback] == [115]
        assert {s.root_id for s in gathered.steps} == {fan}

        # a failing middle step fails the workflow, named; the step after it never runs
        failed = settled(platform, broken, "failed", 2)
        boom = failed.failing[0]
        assert [(s.name, s.id) for s in failed.failing] == [("demo.work", failed.steps[1].id)]
        wait_state(platform, boom.id, "dead")
        assert len(runs.starts("boom")) == 1
        assert view(platform, broken).step_count == 2  # type: ignore[union-attr]
        with Session(platform.history) as session:
            after = session.scalars(sqlalchemy.select(Job).where(Job.parent_id == boom.id)).all()
        assert after == []

        # the command shows the same, to a person and as JSON
        shown = cli(platform, "workflow", broken)
        assert shown.returncode == 0, shown.stderr
        assert f"workflow {broken}: failed, 2 step(s)" in shown.stdout
        assert f"failed at demo.work {boom.id} (dead): SimulatedRejection" in shown.stdout
        as_json: dict[str, Any] = json.loads(cli(platform, "workflow", straight, "--json").stdout)
        assert (as_json["state"], as_json["step_count"]) == ("succeeded", 3)
        assert [s["result"] for s in as_json["steps"]] == [1, 3, 6]
        missing = cli(platform, "workflow", "no-such-root")
        assert missing.returncode != 0
        assert "no workflow with root id 'no-such-root'" in missing.stderr
