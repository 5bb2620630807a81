"""The recorder's write-ahead file: a worker process killed before its next history write
leaves its transitions behind, and another process writes them (SQLite, no server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from history_db import T0, engine_fixture, row  # noqa: F401 - engine_fixture is a fixture
from sqlalchemy import Engine

from tasks_platform.history import recorder as recorder_module
from tasks_platform.history.journal import Journal
from tasks_platform.history.models import JobState
from tasks_platform.history.recorder import Recorder
from tasks_platform.history.writer import Transition
from tasks_platform.settings import Settings


@pytest.fixture(name="in_worker")
def in_worker_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "_in_worker", True)


def _recorder(tmp_path: Path, engine: Engine, **overrides: object) -> Recorder:
    made = Recorder(Settings(data_dir=tmp_path, **overrides), engine)  # type: ignore[arg-type]
    made._thread = object()  # type: ignore[assignment] - no flusher thread: flush by hand
    return made


def _succeeded(job_id: str) -> Transition:
    return Transition(job_id, JobState.SUCCEEDED, 1, T0, worker="w@h", facts={"name": "a.b"})


def test_a_worker_appends_each_transition_ahead_and_empties_the_file_once_written(
    tmp_path: Path, engine: Engine, in_worker: None
) -> None:
    recorder = _recorder(tmp_path, engine)
    recorder.record(_succeeded("j"))
    recorder.record(_succeeded("k"))
    ahead = recorder.journal.ahead_path()
    assert [Transition.from_json(line).job_id for line in ahead.read_text().splitlines()] == [
        "j", "k"
    ]  # fmt: skip
    assert recorder.flush_once()
    assert not ahead.exists()
    assert row(engine, "j").state == "succeeded"


def test_a_producer_writes_nothing_ahead(tmp_path: Path, engine: Engine) -> None:
    recorder = _recorder(tmp_path, engine)
    recorder.record(_succeeded("j"))
    assert not recorder.journal.ahead_path().exists()


def test_write_ahead_can_be_turned_off(tmp_path: Path, engine: Engine, in_worker: None) -> None:
    recorder = _recorder(tmp_path, engine, history_write_ahead=False)
    recorder.record(_succeeded("j"))
    assert not recorder.journal.ahead_path().exists()


def test_the_ahead_file_of_a_killed_process_is_written_by_another(
    tmp_path: Path, engine: Engine
) -> None:
    # a process that recorded a transition ahead and was SIGKILLed before writing it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "journal"
    folder.mkdir()
    left = folder / f"{socket.gethostname()}_{dead.pid}_ahead.jsonl"
    left.write_text(_succeeded("orphan").to_json() + "\n")

    survivor = _recorder(tmp_path, engine)
    survivor.catch_up()

    assert row(engine, "orphan").state == "succeeded"
    assert list(folder.iterdir()) == []


def test_a_live_process_never_claims_its_own_ahead_file(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=10_000)
    journal.ahead_path().write_text(_succeeded("j").to_json() + "\n")
    assert journal.claim() == []
    assert journal.size() == 0  # not counted against the journal's bound
    assert journal.ahead_path().name.split("_")[1] == str(os.getpid())
