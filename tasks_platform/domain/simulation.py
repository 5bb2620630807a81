"""A scripted unit of work for the demo and the tests: sleeps, fails, or crashes on request."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


class SimulatedOutage(Exception):
    """A failure that goes away after a while (retried)."""


class SimulatedRejection(Exception):
    """A failure no retry can fix."""


@dataclass(frozen=True)
class Script:
    label: str
    duration: float
    fail_times: int
    fail_permanently: bool
    crash: bool
    record_to: str | None


def perform(script: Script, *, attempt: int) -> dict[str, object]:
    """Do what the script says on this attempt (1-based).

    With ``record_to`` it appends ``"<label> <attempt> <pid> start|done <unix time>"`` lines,
    so that tests in another process can see every run and every success.
    """
    record = Path(script.record_to) if script.record_to else None
    if record:
        _record(record, f"{script.label} {attempt} {os.getpid()} start {time.time():.6f}")
    if script.crash:
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies, as with a segfault or OOM kill
    if script.duration:
        time.sleep(script.duration)
    if script.fail_permanently:
        raise SimulatedRejection(f"{script.label}: rejected for good")
    if attempt <= script.fail_times:
        raise SimulatedOutage(f"{script.label}: outage on attempt {attempt} of {script.fail_times}")
    if record:
        _record(record, f"{script.label} {attempt} {os.getpid()} done {time.time():.6f}")
    return {"label": script.label, "attempt": attempt}


def _record(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
