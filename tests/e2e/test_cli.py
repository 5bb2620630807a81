"""The ``tasks-platform`` command, run as a user runs it: a separate process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BROKER_URLS, Platform, make_platform, postgres_schema, wait_for

from tasks_platform.process import settings_env

CLI = [sys.executable, "-m", "tasks_platform"]


def _run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")} | env
    return subprocess.run(
        [*CLI, *args], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


def _celery_workers(data_dir: Path) -> set[int]:
    """Celery processes started with ``data_dir`` (or a folder in it) as their data folder."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"celery" not in (proc / "cmdline").read_bytes():
                continue
            environment = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"TASKS_DATA_DIR=" + bytes(data_dir)) for v in environment):
            found.add(int(proc.name))
    return found


@pytest.mark.parametrize("broker", ["embedded", "redis", "rabbitmq"])
def test_demo_runs_the_mixed_workload_and_leaves_nothing_behind(
    broker: str, tmp_path: Path
) -> None:
    with make_platform(broker, tmp_path) as platform:  # checks the service, isolates the run
        env = settings_env(platform.settings)
        env.pop("TASKS_QUEUE_PREFIX")  # the demo picks its own prefix and removes it

        result = _run(env, "demo", "--scale", "0.25", timeout=240)

        assert result.returncode == 0, result.stdout + result.stderr
        assert "every job ended as planned" in result.stdout
        lines = result.stdout.splitlines()
        submitted = int(re.search(r"submitted (\d+) jobs", result.stdout).group(1))  # type: ignore[union-attr]
        header = next(i for i, line in enumerate(lines) if line.startswith("queue "))
        queues = [lines[header + 2 + n].split() for n in range(6)]
        assert [row[0] for row in queues] == [
            "ai", "email", "reports", "webhooks", "payments", "default",
        ]  # fmt: skip
        in_dlq = sum(int(row[-2]) for row in queues)  # the broker's dead-letter queues
        total = next(line for line in lines if line.startswith("total ")).split()
        finished, succeeded, failed, dead = int(total[1]), *(int(x) for x in total[3:6])
        assert finished == submitted == succeeded + dead  # the history's figures
        assert dead == failed == in_dlq > 0
        # per queue, from the history: what each queue was given, and how it ended
        start = lines.index("per queue, from the history:")
        per_queue = {row[0]: row for row in (lines[start + 3 + n].split() for n in range(6))}
        assert sorted(per_queue) == sorted(row[0] for row in queues)
        assert sum(int(row[1]) for row in per_queue.values()) == submitted
        for row in queues:
            queue_row = per_queue[row[0]]
            assert int(queue_row[1]) == int(queue_row[2]) + int(queue_row[4])  # succeeded + dead
            assert int(queue_row[4]) == int(row[-2])  # dead-lettered = its Q.dead holds
        assert "health: " in result.stdout
        assert _celery_workers(platform.settings.data_dir) == set()  # no process left behind
        if broker == "embedded":
            assert not list((tmp_path / "data").glob("demo-*"))  # its folder is removed


def _kill_some_jobs(platform: Platform) -> list[str]:
    platform.worker()
    task = platform.task("demo.work")
    ids = [task.delay(label=f"bad{i}", fail_permanently=True).id for i in range(3)]
    wait_for(lambda: len(platform.dead_letters().list()) == 3, 60, what="three dead letters")
    for worker in platform.workers:
        worker.stop()
    return ids


def test_dlq_commands_list_show_replay_and_purge(tmp_path: Path) -> None:
    with make_platform("redis", tmp_path) as platform:
        env = settings_env(platform.settings)
        ids = _kill_some_jobs(platform)

        listing = _run(env, "dlq", "list")
        assert listing.returncode == 0, listing.stderr
        assert "3 dead letter(s)" in listing.stdout
        assert all(i in listing.stdout for i in ids)
        assert "permanent_error" in listing.stdout

        as_json = [
            json.loads(line)
            for line in _run(env, "dlq", "list", "--json").stdout.split("\n")
            if line
        ]
        assert sorted(d["task_id"] for d in as_json) == sorted(ids)
        assert {d["exception_type"] for d in as_json} == {"SimulatedRejection"}

        shown = json.loads(_run(env, "dlq", "show", ids[0]).stdout)
        assert shown["task_id"] == ids[0]
        assert "SimulatedRejection" in shown["traceback"]

        replay = _run(env, "dlq", "replay", ids[0])
        assert replay.stdout.strip() == "replayed 1 job(s)"
        assert len(platform.dead_letters().list()) == 2
        queue = platform.app.topology.work_queue("default")
        with platform.app.connection_for_write() as connection:
            assert queue(connection.default_channel).queue_declare(passive=True).message_count == 1

        purge = _run(env, "dlq", "purge", "--queue", "default", "--yes")
        assert purge.stdout.strip() == "purged 2 message(s)"
        assert platform.dead_letters().list() == []


def test_cli_errors_are_one_clear_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    with make_platform("redis", tmp_path) as platform:
        env = settings_env(platform.settings)

        missing = _run(env, "dlq", "show", "no-such-id")
        assert missing.returncode == 2
        assert missing.stderr.strip() == "error: no dead letter with task id 'no-such-id'"

        no_target = _run(env, "dlq", "replay")
        assert no_target.returncode == 2
        assert "exactly one of" in no_target.stderr

        bad_queue = _run(env, "dlq", "list", "nosuchqueue")
        assert bad_queue.returncode != 0
        assert "unknown queue 'nosuchqueue'" in bad_queue.stderr


def test_unknown_or_invalid_settings_are_refused_with_the_variable_named(tmp_path: Path) -> None:
    typo = _run({"TASKS_BROKER_ULR": BROKER_URLS["redis"] or ""}, "dlq", "list")
    assert typo.returncode != 0
    assert "TASKS_BROKER_ULR" in typo.stderr

    scheme = _run({"TASKS_BROKER_URL": "bogus://x"}, "dlq", "list")
    assert scheme.returncode != 0
    assert "TASKS_BROKER_URL has scheme 'bogus'" in scheme.stderr


def test_demo_on_a_history_database_without_the_schema_says_what_to_run(tmp_path: Path) -> None:
    with postgres_schema() as url:
        env = {"TASKS_DATA_DIR": str(tmp_path / "data"), "TASKS_DATABASE_URL": url}
        result = _run(env, "demo", "--scale", "0.25")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not at the current schema: run `tasks-platform db upgrade` first" in result.stdout
    assert "Traceback" not in result.stderr
