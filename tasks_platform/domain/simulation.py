"""A scripted unit of work for the demo and the tests: sleeps, fails, or crashes on request."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
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
    #: report progress this many times, evenly over ``duration`` (the last report says 100)
    progress_steps: int = 0
    #: LLM token counts to return as the result's ``usage`` (as an OpenAI-style API does)
    usage: dict[str, int] | None = None


def perform(
    script: Script,
    *,
    attempt: int,
    checkpoint: Callable[[], None] | None = None,
    progress: Callable[[float, str | None], None] | None = None,
) -> dict[str, object]:
    """Do what the script says on this attempt (1-based).

    With ``record_to`` it appends ``"<label> <attempt> <pid> start|done <unix time>"`` lines,
    so that tests in another process can see every run and every success. While it sleeps it
    calls ``checkpoint`` every tenth of a second, which may raise to stop the work. With
    ``progress_steps`` it tells ``progress`` how far it is after each step of its duration.
    """
    record = Path(script.record_to) if script.record_to else None
    if record:
        _record(record, f"{script.label} {attempt} {os.getpid()} start {time.time():.6f}")
    if script.crash:
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies, as with a segfault or OOM kill
    steps = script.progress_steps if progress is not None else 0
    for step in range(1, steps + 1):
        _sleep(script.duration / steps, checkpoint)
        if progress is not None:
            progress(100.0 * step / steps, f"attempt {attempt}: step {step} of {steps}")
    if script.duration and not steps:
        _sleep(script.duration, checkpoint)
    if script.fail_permanently:
        raise SimulatedRejection(f"{script.label}: rejected for good")
    if attempt <= script.fail_times:
        raise SimulatedOutage(f"{script.label}: outage on attempt {attempt} of {script.fail_times}")
    if record:
        _record(record, f"{script.label} {attempt} {os.getpid()} done {time.time():.6f}")
    result: dict[str, object] = {"label": script.label, "attempt": attempt}
    if script.usage is not None:
        result["usage"] = dict(script.usage)
    return result


def _sleep(seconds: float, checkpoint: Callable[[], None] | None) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if checkpoint is not None:
            checkpoint()
        time.sleep(min(left, 0.1))


def _record(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
