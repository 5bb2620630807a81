"""A scripted unit of work for the demo and the tests: sleeps, fails, or crashes on request."""

from __future__ import annotations

import hashlib
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
    #: a folder where a successful run applies its side effect, once per effect key
    effects_to: str | None = None


def perform(
    script: Script,
    *,
    attempt: int,
    checkpoint: Callable[[], None] | None = None,
    progress: Callable[[float, str | None], None] | None = None,
    effect_key: str | None = None,
) -> dict[str, object]:
    """Do what the script says on this attempt (1-based).

    With ``record_to`` it appends ``"<label> <attempt> <pid> start|done <unix time>"`` lines,
    so that tests in another process can see every run and every success. While it sleeps it
    calls ``checkpoint`` every tenth of a second, which may raise to stop the work. With
    ``progress_steps`` it tells ``progress`` how far it is after each step of its duration.
    With ``effects_to`` a successful run applies its side effect there at most once per
    ``effect_key`` (else the label), as an idempotent job does (see :func:`apply_once`).
    """
    record = Path(script.record_to) if script.record_to else None
    if record:
        _record(record, f"{script.label} {attempt} {os.getpid()} start {time.time():.6f}")
    if script.crash:
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies, as with a segfault or OOM kill
    _spend(script, attempt=attempt, checkpoint=checkpoint, progress=progress)
    if script.fail_permanently:
        raise SimulatedRejection(f"{script.label}: rejected for good")
    if attempt <= script.fail_times:
        raise SimulatedOutage(f"{script.label}: outage on attempt {attempt} of {script.fail_times}")
    result: dict[str, object] = {"label": script.label, "attempt": attempt}
    if script.effects_to:
        applied = apply_once(Path(script.effects_to), effect_key or script.label)
        result["effect"] = "applied" if applied else "repeated"
    if record:
        _record(record, f"{script.label} {attempt} {os.getpid()} done {time.time():.6f}")
    if script.usage is not None:
        result["usage"] = dict(script.usage)
    return result


def _spend(
    script: Script,
    *,
    attempt: int,
    checkpoint: Callable[[], None] | None,
    progress: Callable[[float, str | None], None] | None,
) -> None:
    """Take the script's duration, in ``progress_steps`` reported steps if there are any."""
    steps = script.progress_steps if progress is not None else 0
    for step in range(1, steps + 1):
        _sleep(script.duration / steps, checkpoint)
        if progress is not None:
            progress(100.0 * step / steps, f"attempt {attempt}: step {step} of {steps}")
    if script.duration and not steps:
        _sleep(script.duration, checkpoint)


def apply_once(folder: Path, key: str) -> bool:
    """Apply the side effect of ``key`` unless a run did already: True if this run applied it.

    The effect is a file named after the key, created with ``O_EXCL``: of two runs of one key
    (a redelivery after a crash), exactly one creates it, as a unique key in a database makes
    one insert win. Every run also appends ``"<key hash> applied|repeated <pid>"`` to
    ``effects.log`` in the folder, so that tests can count the repeats the key absorbed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    try:
        handle = os.open(folder / f"{digest}.effect", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        applied = False
    else:
        with os.fdopen(handle, "w", encoding="utf-8") as effect:
            effect.write(key)
        applied = True
    outcome = "applied" if applied else "repeated"
    _record(folder / "effects.log", f"{digest} {outcome} {os.getpid()}")
    return applied


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
