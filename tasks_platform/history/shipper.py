"""The history writer process of a worker: the one process that writes the worker's history.

A worker's processes (main and pool) do not write the history themselves: each appends the
transitions it records, as JSON lines, to a segment file of its own in the journal folder
(``<host>_<pid>_ship-<worker pid>-<n>.jsonl``) and goes on with its jobs. This process, started
by the worker's main process when the worker starts, reads the segments as they grow and writes
what they hold in batches (:func:`~tasks_platform.history.writer.apply_transitions`), then
deletes each segment that its process closed (it went on to the next) or left (it ended).

So a job never waits for the database, and the database work runs in a process of its own, on
whatever core is free, instead of taking the interpreter lock from the jobs of a pool process.
Nothing is lost on the way: a line is in the kernel before the job is acknowledged (a killed
pool process loses none), a database outage only makes the segments wait (bounded by the
journal's size: past it a process buffers and journals as before), and a writer process that
dies is started again by the main process and reads every segment from its start (writing a
transition twice changes nothing). When the worker stops, the main process waits for this
process to write everything; a worker killed outright leaves its segments for the next
process on the host that catches up (:meth:`~tasks_platform.history.journal.Journal.claim`).

:class:`WriterProcess` starts it, as a fork of the worker's main process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Engine

from tasks_platform.history.journal import Segment, alive, parse
from tasks_platform.history.recorder import Recorder, forget_writer
from tasks_platform.history.writer import Transition
from tasks_platform.settings import Settings

logger = logging.getLogger(__name__)
#: seconds between looks at the segments while they are growing
_BUSY_POLL = 0.25
#: at most this many bytes are read from one segment at a time
_READ_BYTES = 8 * 1024 * 1024
#: seconds between looks for the journals of stopped processes
_CATCH_UP_EVERY = 10.0
_MAX_BACKOFF = 5.0
#: a writer whose worker is done gives up after the database failed this long (seconds)
_GIVE_UP_AFTER = 30.0
#: how much lower this process's CPU priority is than the worker's
NICENESS = 10
#: what the worker's main process says to this process when it is done
STOP = b"stop"
#: the writer process's name (``comm``), as ps and top show it
PROCESS_NAME = "history-writer"


@dataclass
class _Read:
    """What one pass read from a segment: its transitions, and where the next read starts."""

    segment: Segment
    end: int
    closed: bool
    transitions: list[Transition] = field(default_factory=list)


class Shipper:
    """Reads worker ``owner``'s segments and writes them into the history database."""

    def __init__(self, settings: Settings, *, owner: int, engine: Engine | None = None) -> None:
        self.settings = settings
        self.owner = owner
        self.recorder = Recorder(settings, engine)  # its write(), catch-up and failure logging
        self.journal = self.recorder.journal
        self.offsets: dict[Path, int] = {}
        #: set when the worker is done: its processes closed their segments for good
        self.final = threading.Event()
        #: set when the worker's main process is gone, done or not
        self.orphaned = threading.Event()
        self.wake = threading.Event()

    def run(self) -> None:
        """Write until the worker is done (or gone) and nothing is left to write."""
        delay, caught_up, failing_since = self.settings.history_flush_interval, 0.0, 0.0
        while True:
            final = self.final.is_set()
            finishing = final or self.orphaned.is_set() or not alive(self.owner)
            if time.monotonic() - caught_up > _CATCH_UP_EVERY:
                self.recorder.catch_up()
                caught_up = time.monotonic()
            written = self.pass_once(final=final)
            if written is None:  # the database failed: everything waits on disk
                failing_since = failing_since or time.monotonic()
                if finishing and time.monotonic() - failing_since > _GIVE_UP_AFTER:
                    logger.error("history writer stopping with the database unavailable: the "
                                 "segments stay in %s for the next process to write",
                                 self.journal.folder)  # fmt: skip
                    return
                delay = min(max(delay, _BUSY_POLL) * 2, _MAX_BACKOFF)
            elif written:
                # a busy worker: wait the flush interval, so that batches go out full (fewer,
                # larger transactions: the database's work per job is smaller); else soon
                busy = written >= self.settings.history_batch_size
                delay = self.settings.history_flush_interval if busy else _BUSY_POLL
                failing_since = 0.0
            elif finishing:
                failing_since = 0.0
                if not self.journal.segments(self.owner):
                    return
                delay = _BUSY_POLL  # segments of processes still ending
            else:
                failing_since = 0.0
                delay = min(self.settings.history_flush_interval, max(delay, _BUSY_POLL) * 2)
            self.wake.wait(delay)
            self.wake.clear()

    def pass_once(self, *, final: bool = False) -> int | None:
        """Write what the segments gained since the last pass; how many transitions that was
        (None if the database did not take them: nothing is lost, the next pass tries again).
        ``final``: the worker's processes will append nothing more."""
        reads = [self._read(listed) for listed in self._listed(final=final)]
        transitions = [t for read in reads for t in read.transitions]
        # progress reports after the starts of their attempts (a report before its start
        # would be ignored), whatever the order of the segments
        transitions.sort(key=lambda t: t.report)
        if not self.recorder.write_all(transitions):
            return None
        for read in reads:
            self.offsets[read.segment.path] = read.end
            if read.closed and read.end >= _size(read.segment.path):
                read.segment.path.unlink(missing_ok=True)
                self.offsets.pop(read.segment.path, None)
        return len(transitions)

    def _listed(self, *, final: bool) -> list[tuple[Segment, bool]]:
        """The segments, each with whether its process will write no more to it: it went on to
        a newer segment, or it ended (decided before reading, so the read sees its last line)."""
        segments = self.journal.segments(self.owner)
        newest: dict[int, int] = {}
        for segment in segments:
            newest[segment.pid] = max(newest.get(segment.pid, 0), segment.number)
        listed = []
        for segment in segments:
            ended = final or segment.number < newest[segment.pid] or not alive(segment.pid)
            listed.append((segment, ended))
        known = {segment.path for segment, _ in listed}
        for path in [path for path in self.offsets if path not in known]:
            del self.offsets[path]  # deleted, or claimed by another process
        return listed

    def _read(self, listed: tuple[Segment, bool]) -> _Read:
        segment, closed = listed
        start = self.offsets.get(segment.path, 0)
        try:
            with segment.path.open("rb") as handle:
                handle.seek(start)
                data = handle.read(_READ_BYTES)
        except FileNotFoundError:  # claimed by another process meanwhile: it writes it
            return _Read(segment, start, closed=False)
        complete = data.rfind(b"\n") + 1
        read = _Read(segment, start + complete, closed=closed and len(data) < _READ_BYTES)
        read.transitions, bad = parse(data[:complete].splitlines())
        if read.closed and complete < len(data):
            bad += 1  # the last line of a process killed while it wrote it
            read.end = start + len(data)
        if bad:
            logger.error("history segment %s: %d unreadable line(s) skipped",
                         segment.path.name, bad)  # fmt: skip
        return read


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class WriterProcess:
    """The history writer process of the worker whose main process this is, kept running.

    The writer is a fork of the worker's main process (as Celery's pool processes are), started
    before the pool: it has everything imported already, so it starts in milliseconds and
    takes no CPU from the first jobs (a new interpreter spent about a second importing).
    """

    def __init__(self, settings: Settings, *, stop_timeout: float = 60.0) -> None:
        self.settings = settings
        self.owner = os.getpid()
        self.stop_timeout = stop_timeout
        self._process: ForkedProcess | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> WriterProcess:
        self._spawn()
        threading.Thread(target=self._supervise, name="history-writer", daemon=True).start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            self._process = ForkedProcess(_write, self.settings, self.owner)

    def _supervise(self) -> None:
        """Start the writer again should it end while the worker runs (its segments wait)."""
        backoff = 1.0
        while not self._stopping.is_set():
            process = self._process
            assert process is not None
            code = process.wait()
            if self._stopping.is_set():
                return
            logger.error("history writer process ended (exit code %s); starting it again in "
                         "%.0f s", code, backoff)  # fmt: skip
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)
            self._spawn()

    def stop(self) -> None:
        """Ask the writer to write everything and end; wait for it (bounded)."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            process.say(STOP)
        except (OSError, ValueError):  # it ended meanwhile, or was told already
            return
        if process.wait(self.stop_timeout) is None:
            logger.error("history writer process did not finish within %.0f s; it goes on "
                         "writing after the worker", self.stop_timeout)  # fmt: skip


class ForkedProcess:
    """``target(*args, said)`` in a fork of this process; ``said`` is a file that gives what
    :meth:`say` writes, then an end of file (also when this process ends without saying).
    The child ends with ``target``'s return value as exit code, running none of this process's
    exit handlers; an exception in ``target`` is logged and ends it with 1."""

    def __init__(self, target: Callable[..., int], *args: object) -> None:
        said_r, said_w = os.pipe()
        ended_r, ended_w = os.pipe()  # closed only by the child's end: readable (EOF) then
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (the tests see what it does)
            code = 1
            try:
                os.close(said_w)
                os.close(ended_r)
                with os.fdopen(said_r, "rb") as said:
                    code = target(*args, said)
            except BaseException:
                logger.exception("%s failed", getattr(target, "__name__", target))
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(said_r)
        os.close(ended_w)
        self.pid = pid
        self.returncode: int | None = None
        self._said = os.fdopen(said_w, "wb", buffering=0)
        self._ended = ended_r
        self._lock = threading.Lock()

    def say(self, data: bytes) -> None:
        """Write ``data`` to the child's ``said``, then the end of it (once)."""
        with self._said:
            self._said.write(data)

    def wait(self, timeout: float | None = None) -> int | None:
        """The child's exit code once it ended; None if it still runs after ``timeout`` s."""
        if self.returncode is None:
            poller = select.poll()
            poller.register(self._ended, select.POLLIN)
            if not poller.poll(None if timeout is None else max(timeout, 0.0) * 1000):
                return None
            with self._lock:
                if self.returncode is None:
                    try:
                        _, status = os.waitpid(self.pid, 0)
                        self.returncode = os.waitstatus_to_exitcode(status)
                    except ChildProcessError:  # reaped by someone else: its code is unknown
                        self.returncode = -1
        return self.returncode

    def poll(self) -> int | None:
        return self.wait(0)

    def __del__(self) -> None:
        # closed only now: another thread may be waiting on them until then
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._ended)
        with contextlib.suppress(AttributeError, OSError, ValueError):
            self._said.close()


def _write(settings: Settings, owner: int, said: BinaryIO) -> int:
    """The writer process: write worker ``owner``'s history until it says stop (or ends)."""
    # a copy of the worker's main process: none of its signal handlers (Celery's warm and cold
    # shutdown, restart ...) apply here, and only the worker ends this process, once its
    # processes are done: a SIGTERM sent to the whole group (systemd, Ctrl-C) reaches jobs
    # still running, which have history to come
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    forget_writer()  # this process writes; it ships to no one
    with contextlib.suppress(OSError):  # its name in ps and top (Linux), not the worker's
        Path("/proc/self/comm").write_text(PROCESS_NAME)
    os.nice(NICENESS)  # the jobs first: the history waits on disk meanwhile
    shipper = Shipper(settings, owner=owner)
    threading.Thread(target=_listen, args=(shipper, said), daemon=True).start()
    try:
        shipper.run()
    finally:
        shipper.recorder.close()
    return 0


def _listen(shipper: Shipper, said: BinaryIO) -> None:
    """The worker's main process says ``stop`` when it is done; an end of input without it
    means that process is gone. Only those bytes are waited for: the worker's pool processes,
    forked after this one, hold the pipe open too, so its end may come later."""
    data = said.read(len(STOP))
    (shipper.final if data.startswith(STOP) else shipper.orphaned).set()
    shipper.wake.set()
