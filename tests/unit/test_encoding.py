"""The history's JSON: what orjson writes, what it refuses, and lines that hold any text."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from history_db import T0, engine_fixture, row  # noqa: F401 - engine_fixture is a fixture
from sqlalchemy import Engine

from tasks_platform.history import recorder as recorder_module
from tasks_platform.history.encoding import dump_line, dumps, loads
from tasks_platform.history.models import JobState
from tasks_platform.history.recorder import Recorder
from tasks_platform.history.shipper import Shipper
from tasks_platform.history.writer import Transition
from tasks_platform.settings import Settings


def test_values_json_has_no_type_for_are_written_as_text_and_times_in_iso_8601() -> None:
    at = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)
    assert loads(dumps({"at": at, "tags": {"a"}, 3: "three"})) == {
        "at": "2026-12-06T05:00:00+00:00", "tags": "{'a'}", "3": "three"
    }  # fmt: skip


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_float_that_is_not_finite_is_written_as_null(value: float) -> None:
    assert dumps({"score": value}) == '{"score":null}'
    assert dumps({"score": value, "big": 2**70}) == f'{{"score":null,"big":{2**70}}}'


def test_an_integer_beyond_64_bits_is_written_exactly() -> None:
    at = datetime(2026, 12, 6, tzinfo=UTC)
    assert loads(dumps({"n": [2**70, -(2**80)], "at": at})) == {
        "n": [2**70, -(2**80)], "at": "2026-12-06T00:00:00+00:00"
    }  # fmt: skip
    assert dump_line(2**70) == f"{2**70}\n".encode()


def test_text_the_standard_library_wrote_is_read_too() -> None:
    assert math.isnan(loads(json.dumps({"x": math.nan}))["x"])
    with pytest.raises(ValueError, match="Unterminated string"):
        loads('{"cut')


def test_a_transition_with_line_separators_in_its_text_stays_one_line(
    tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """orjson writes U+2028 and friends as they are: lines are split on newlines only."""
    monkeypatch.setattr(recorder_module, "_in_worker", True)
    monkeypatch.setattr(recorder_module, "_writer_owner", 1)  # pid 1: a live owner
    recorder = Recorder(Settings(data_dir=tmp_path), engine)
    recorder._thread = object()  # type: ignore[assignment] - no flusher thread
    note = "line\u2028separator\x85next\u00e9\U0001f600"
    recorder.record(Transition("j", JobState.STARTED, 1, T0, worker="w@h",
                               facts={"name": "a.b", "args": [note]}))  # fmt: skip
    line = recorder.journal.segments(1)[0].path.read_bytes()
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")

    shipper = Shipper(Settings(data_dir=tmp_path), owner=1, engine=engine)
    assert shipper.pass_once() == 1
    assert row(engine, "j").args == [note]
    recorder._thread = None
    recorder.close()
