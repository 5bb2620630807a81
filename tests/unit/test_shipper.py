"""The history writer process of a worker: the worker's processes append their transitions to
segment files, and one process writes them into the history (SQLite, no server)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from history_db import T0, engine_fixture, row  # noqa: F401 - engine_fixture is a fixture
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tasks_platform.history import recorder as recorder_module
from tasks_platform.history.database import create_history_engine
from tasks_platform.history.journal import Journal
from tasks_platform.history.models import JobEvent, JobState
from tasks_platform.history.recorder import Recorder
from tasks_platform.history.shipper import Shipper, WriterProcess
from tasks_platform.history.writer import Transition
from tasks_platform.settings import Settings

#: the worker whose writer the tests play: this test process itself (alive)
OWNER = os.getpid()


@pytest.fixture(name="shipping")
def shipping_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process is a worker's process whose writer process writes its history."""
    monkeypatch.setattr(recorder_module, "_in_worker", True)
    monkeypatch.setattr(recorder_module, "_writer_owner", OWNER)


@pytest.fixture(name="make_recorder")
def make_recorder_fixture(tmp_path: Path, engine: Engine) -> Iterator[Callable[..., Recorder]]:
    """Recorders of this process (no flusher thread: flush by hand), closed afterwards."""
    made: list[Recorder] = []

    def make(**overrides: Any) -> Recorder:
        recorder = Recorder(Settings(data_dir=tmp_path, **overrides), engine)
        recorder._thread = object()  # type: ignore[assignment]
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        recorder._thread = None
        recorder.close()


def _shipper(tmp_path: Path, engine: Engine, owner: int = OWNER) -> Shipper:
    return Shipper(Settings(data_dir=tmp_path), owner=owner, engine=engine)


def _started(job_id: str, attempt: int = 1) -> Transition:
    facts = {"name": "a.b", "queue": "default"}
    return Transition(job_id, JobState.STARTED, attempt, T0, worker="w@h", facts=facts)


def _succeeded(job_id: str) -> Transition:
    return Transition(job_id, JobState.SUCCEEDED, 1, T0 + 1, worker="w@h", facts={"name": "a.b"})


def _report(job_id: str, percent: float) -> Transition:
    """A progress report of the job's first attempt."""
    return Transition(job_id, JobState.STARTED, 1, T0, facts={"percent": percent}, report=True)


def _dead_pid() -> int:
    """The id of a process that ran and ended (as if killed)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _events(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(JobEvent)) or 0)


def test_a_worker_process_appends_to_its_segment_and_keeps_nothing_to_write_itself(
    tmp_path: Path, engine: Engine, shipping: None, make_recorder: Callable[..., Recorder]
) -> None:
    recorder = make_recorder()
    recorder.record(_started("j"))
    recorder.record(_succeeded("j"))

    (segment,) = Journal(tmp_path / "journal", max_bytes=10**6).segments(OWNER)
    assert segment.pid == os.getpid()
    assert segment.number == 1
    lines = segment.path.read_text().splitlines()
    assert [Transition.from_json(line).state for line in lines] == ["started", "succeeded"]
    assert recorder.pending() == 0  # nothing buffered in memory
    assert not recorder.journal.ahead_path().exists()  # the segment is the write-ahead
    assert _events(engine) == 0  # and nothing written by the process itself


def test_the_writer_writes_what_a_segment_gains_and_keeps_the_segment_its_process_still_uses(
    tmp_path: Path, engine: Engine, shipping: None, make_recorder: Callable[..., Recorder]
) -> None:
    recorder = make_recorder()
    shipper = _shipper(tmp_path, engine)
    recorder.record(_started("j"))
    assert shipper.pass_once() == 1
    assert row(engine, "j").state == "started"

    recorder.record(_succeeded("j"))
    assert shipper.pass_once() == 1  # only what was appended since
    assert shipper.pass_once() == 0
    assert row(engine, "j").state == "succeeded"
    assert _events(engine) == 2
    assert len(shipper.journal.segments(OWNER)) == 1  # its process may append more


def test_a_segment_its_process_went_past_is_deleted_once_written(
    tmp_path: Path,
    engine: Engine,
    shipping: None,
    make_recorder: Callable[..., Recorder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recorder_module, "SEGMENT_BYTES", 1)  # a new segment for every line
    recorder = make_recorder()
    for number in range(3):
        recorder.record(_started(f"j{number}"))
    shipper = _shipper(tmp_path, engine)
    assert len(shipper.journal.segments(OWNER)) == 3

    assert shipper.pass_once() == 3
    assert [s.number for s in shipper.journal.segments(OWNER)] == [3]  # the one still in use
    assert shipper.pass_once(final=True) == 0  # the worker is done: nothing more comes
    assert shipper.journal.segments(OWNER) == []
    assert _events(engine) == 3


def test_the_segment_of_a_killed_process_is_written_without_its_cut_last_line(
    tmp_path: Path, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "journal"
    folder.mkdir()
    segment = folder / f"{socket.gethostname()}_{_dead_pid()}_ship-{OWNER}-1.jsonl"
    cut = _succeeded("j").to_json()[:25]  # killed while it wrote this line
    segment.write_text(_started("j").to_json() + "\n" + cut)

    with caplog.at_level(logging.ERROR):
        assert _shipper(tmp_path, engine).pass_once() == 1
    assert row(engine, "j").state == "started"
    assert not segment.exists()
    assert "1 unreadable line(s) skipped" in caplog.text


def test_nothing_is_lost_while_the_database_is_down(
    tmp_path: Path, engine: Engine, shipping: None, make_recorder: Callable[..., Recorder]
) -> None:
    recorder = make_recorder()
    recorder.record(_started("j"))
    down = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://u@127.0.0.1:1/none")
    shipper = Shipper(down, owner=OWNER)
    assert shipper.pass_once(final=True) is None  # the database did not take it
    assert len(shipper.journal.segments(OWNER)) == 1  # kept, unread

    shipper.recorder = Recorder(Settings(data_dir=tmp_path), engine)  # the database is back
    assert shipper.pass_once(final=True) == 1
    assert row(engine, "j").state == "started"
    assert shipper.journal.segments(OWNER) == []


def test_progress_reports_are_appended_once_per_flush_and_written_after_their_start(
    tmp_path: Path, engine: Engine, shipping: None, make_recorder: Callable[..., Recorder]
) -> None:
    recorder = make_recorder()
    recorder.record(_started("j"))
    for percent in (10.0, 20.0, 30.0):
        recorder.report(_report("j", percent))
    assert recorder.flush_once()
    (segment,) = Journal(tmp_path / "journal", max_bytes=10**6).segments(OWNER)
    assert len(segment.path.read_text().splitlines()) == 2  # the start and the latest report

    _shipper(tmp_path, engine).pass_once()
    assert row(engine, "j").percent == 30.0
    assert _events(engine) == 1  # a report is not a transition


def test_a_process_whose_writer_is_far_behind_writes_its_history_itself(
    tmp_path: Path,
    engine: Engine,
    shipping: None,
    make_recorder: Callable[..., Recorder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recorder_module, "SEGMENT_BYTES", 1)
    recorder = make_recorder(history_journal_max_bytes=1024)
    for number in range(10):  # a few hundred bytes each: the journal's bound is passed
        recorder.record(_started(f"j{number}"))
    assert recorder.pending() > 0  # buffered in memory from then on
    assert recorder.flush_once()
    shipper = _shipper(tmp_path, engine)
    shipper.pass_once(final=True)
    assert _events(engine) == 10  # each written once, by one or the other


def test_segments_of_a_running_worker_are_claimed_by_no_other_process(tmp_path: Path) -> None:
    dead = _dead_pid()
    journal = Journal(tmp_path, max_bytes=10**6)
    host = socket.gethostname()
    ours = tmp_path / f"{host}_{dead}_ship-{OWNER}-1.jsonl"  # our worker runs: its writer's
    orphan = tmp_path / f"{host}_{dead}_ship-{dead}-1.jsonl"  # that worker is gone
    for path in (ours, orphan):
        path.write_text(_started("j").to_json() + "\n")

    claimed = journal.claim()
    assert ours.exists()
    assert len(claimed) == 1
    assert not orphan.exists()
    assert journal.size() > 0  # segments count against the journal's bound


def test_the_writer_process_writes_everything_when_its_worker_says_stop(
    tmp_path: Path, shipping: None
) -> None:
    settings = Settings(data_dir=tmp_path / "worker")  # the writer migrates its database
    recorder = Recorder(settings)
    recorder.record(_started("j"))
    recorder.record(_succeeded("j"))
    recorder._stop_shipping()
    writer = WriterProcess(settings).start()  # a fork of this process (its worker)
    process = writer._process
    assert process is not None
    writer.stop()
    assert process.poll() == 0
    engine = create_history_engine(settings)
    try:
        assert row(engine, "j").state == "succeeded"
    finally:
        engine.dispose()
    assert recorder.journal.segments(OWNER) == []


def test_a_writer_process_that_dies_is_started_again_and_writes_what_waited(
    tmp_path: Path, shipping: None
) -> None:
    settings = Settings(data_dir=tmp_path / "worker", history_flush_interval=0.1)
    writer = WriterProcess(settings).start()
    try:
        first = writer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        recorder = Recorder(settings)
        recorder.record(_started("j"))  # in the segment meanwhile: it waits for the next one
        deadline = time.monotonic() + 30
        while writer.pid == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.pid != first, "the writer process was not started again"
        recorder._stop_shipping()
    finally:
        writer.stop()
    engine = create_history_engine(settings)
    try:
        assert row(engine, "j").state == "started"
    finally:
        engine.dispose()


def test_a_report_waiting_goes_out_with_the_next_transition_of_its_process(
    tmp_path: Path, engine: Engine, shipping: None, make_recorder: Callable[..., Recorder]
) -> None:
    recorder = make_recorder()
    recorder.record(_started("j"))
    recorder.report(_report("j", 100.0))
    recorder.record(_succeeded("j"))  # no flush in between: the job ended at once

    _shipper(tmp_path, engine).pass_once()
    assert (row(engine, "j").state, row(engine, "j").percent) == ("succeeded", 100.0)
