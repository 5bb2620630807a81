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
    """Do what the script says on this attempt (1-based)."""
    if script.record_to:
        _record(Path(script.record_to), f"{script.label} {attempt} {os.getpid()}")
    if script.crash:
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies, as with a segfault or OOM kill
    if script.duration:
        time.sleep(script.duration)
    if script.fail_permanently:
        raise SimulatedRejection(f"{script.label}: rejected for good")
    if attempt <= script.fail_times:
        raise SimulatedOutage(f"{script.label}: outage on attempt {attempt} of {script.fail_times}")
    return {"label": script.label, "attempt": attempt}


def _record(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
