"""The recorder: the one place Celery signals are connected, and the per-process history writer.

Signal handlers only append a :class:`Transition` to an in-memory buffer; a background thread
per process writes the buffer in batches (:func:`apply_transitions`). A database outage never
fails, blocks or slows a job: the buffer keeps up to ``history_buffer_max`` transitions, older
ones spill to a journal of JSON lines under ``<data dir>/journal``, and everything is written
once the database answers again (journals of other, stopped, processes included). Only when the
journal is full too are transitions dropped, and that is logged loudly with counts. With
``history_write_ahead`` (the default) a worker process also appends each transition to its
write-ahead file as it records it (before the job is acknowledged), so that a worker killed
before its next write (SIGKILL, OOM) leaves its transitions for another process to write (see
:mod:`tasks_platform.history.journal`). Producers do not: what they record (``queued``) is
also recorded by the worker that runs the job.

In a worker whose main process started a history writer process (the default, see
:mod:`tasks_platform.history.shipper`), the worker's processes write nothing into the database:
each transition is appended to the process's segment file and the job goes on; the writer
process writes the segments. Progress reports are still coalesced in memory and appended once
per flush interval (or with the process's next transition). Should a segment fail to take a
line (disk error), or the journal folder outgrow its bound (the writer far behind), the process
falls back to buffering as above.

Producer side: ``after_task_publish`` (queued). Worker side: ``task_prerun`` (started),
``task_retry`` (retrying), ``task_success`` (succeeded), ``task_failure`` (failed),
``task_revoked`` (revoked / expired); dead-lettering and replay report through :func:`record`.
Progress reports (``job_progress``, from ``JobContext.report_progress``) are coalesced: only the
latest report of each job waits for the next write, however often a job reports.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from celery import signals
from sqlalchemy import Engine

from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.journal import Journal
from tasks_platform.history.models import JobState
from tasks_platform.history.redaction import bounded, bounded_text, redact
from tasks_platform.history.writer import Transition, apply_transitions
from tasks_platform.jobs.declaration import (
    PRIORITY_HEADER,
    PUBLISHING_APP,
    REPLAYS_HEADER,
    RETRY_OF_HEADER,
    PlatformTask,
    job_progress,
)
from tasks_platform.settings import Settings

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery
    from tasks_platform.history.shipper import WriterProcess

logger = logging.getLogger(__name__)
_MAX_BACKOFF = 5.0
#: a process starts a new segment once its current one holds this many bytes
SEGMENT_BYTES = 4 * 1024 * 1024


class Recorder:
    """Buffers transitions and writes them from a background thread; one per process."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self._buffer: deque[Transition] = deque()
        self._reports: dict[str, Transition] = {}  # job id -> its latest progress report
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._engine = engine
        self._sessions = session_factory(engine) if engine is not None else None
        self._thread: threading.Thread | None = None
        self.journal = Journal(
            settings.data_dir / "journal", max_bytes=settings.history_journal_max_bytes
        )
        self.written = 0
        self.failures = 0
        #: the write-ahead file, open while it holds transitions not yet written, and its size
        self._ahead: IO[str] | None = None
        self._ahead_bytes = 0
        #: the worker whose writer process writes this process's segments (None: write here)
        self._owner = _writer_owner if settings.history_write_ahead else None
        self._segment: IO[bytes] | None = None
        self._segment_number = 0
        self._segment_bytes = 0

    # -- the hot path ------------------------------------------------------------------------
    def record(self, transition: Transition) -> None:
        if self._owner is not None:
            shipped = transition.to_line()
            with self._lock:
                # reports waiting go first: a job's last report before the end of its attempt
                if self._ship([*self._report_lines(), shipped]):
                    self._reports.clear()
                    return
        ahead = _in_worker and self.settings.history_write_ahead
        line = transition.to_json() + "\n" if ahead else None
        with self._lock:
            self._buffer.append(transition)
            size = len(self._buffer)
            if line is not None:
                self._write_ahead(line)
        if self._thread is None:
            self._start()
        if size >= self.settings.history_batch_size:
            self._wake.set()

    def report(self, transition: Transition) -> None:
        """Keep ``transition`` (a progress report) until the next write, replacing the job's
        earlier report: a job reporting in a tight loop costs one row update per flush."""
        with self._lock:
            self._reports[transition.job_id] = transition
        if self._thread is None:
            self._start()

    def _write_ahead(self, line: str) -> None:
        """Append ``line`` to the write-ahead file (under the lock); a failure only loses the
        crash safety of this transition, never the transition. Bounded like the journal: in a
        long database outage the journal keeps what the buffer cannot, and only that."""
        if self._ahead_bytes > self.settings.history_journal_max_bytes:
            return
        self._ahead_bytes += len(line)
        try:
            if self._ahead is None:
                self.journal.folder.mkdir(parents=True, exist_ok=True)
                self._ahead = self.journal.ahead_path().open("a", encoding="utf-8")
            self._ahead.write(line)
            self._ahead.flush()  # in the kernel: survives this process being killed
        except OSError:
            logger.exception("history write-ahead file %s failed", self.journal.ahead_path())

    def _ship(self, lines: list[bytes]) -> bool:
        """Append ``lines`` to this process's segment (under the lock); False if it could not
        take them, after which this process buffers and writes its history itself."""
        owner = self._owner
        if owner is None:
            return False
        try:
            if self._segment is None or self._segment_bytes >= SEGMENT_BYTES:
                self._next_segment(owner)
            if self._segment is None:
                return False
            data = b"".join(lines)
            self._segment.write(data)
            self._segment_bytes += len(data)
            self._segment.flush()  # in the kernel: the writer process reads it from there
        except OSError:
            logger.exception("history segment of worker %d failed: this process writes its "
                             "history itself from now on", owner)  # fmt: skip
            self._stop_shipping()
            return False
        return True

    def _next_segment(self, owner: int) -> None:
        """Close the segment (the writer deletes it once written) and open the next one,
        unless the journal folder is over its bound: then stop shipping."""
        if self._segment is not None:
            self._segment.close()
            self._segment = None
            waiting = self.journal.size()
            if waiting > self.journal.max_bytes:
                logger.error("history writer process of worker %d is behind (%d bytes waiting): "
                             "this process writes its history itself from now on",
                             owner, waiting)  # fmt: skip
                self._stop_shipping()
                return
        self.journal.folder.mkdir(parents=True, exist_ok=True)
        self._segment_number += 1
        self._segment = self.journal.segment_path(owner, self._segment_number).open("ab")
        self._segment_bytes = 0

    def _stop_shipping(self) -> None:
        self._owner = None
        if self._segment is not None:
            with contextlib.suppress(OSError):
                self._segment.close()
            self._segment = None

    def _ship_reports(self) -> None:
        """Append the latest progress report of each job to the segment."""
        with self._lock:
            if self._owner is not None and self._reports and self._ship(self._report_lines()):
                self._reports.clear()

    def _report_lines(self) -> list[bytes]:
        """The progress reports waiting (under the lock), as lines."""
        return [report.to_line() for report in self._reports.values()]

    def _forget_ahead(self) -> None:
        """Everything recorded so far is written (or journaled): empty the write-ahead file.
        Called with the lock held, so that no transition is appended meanwhile."""
        self._ahead_bytes = 0
        if self._ahead is None:
            return
        self._ahead.close()
        self._ahead = None
        self.journal.ahead_path().unlink(missing_ok=True)

    # -- the flusher -------------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="history-recorder", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        delay = self.settings.history_flush_interval
        while not self._stop.is_set():
            full = self._wake.wait(delay)  # a full batch is waiting; else the interval passed
            self._wake.clear()
            if self.flush_once(whole_batches=full):
                delay = self.settings.history_flush_interval
                self.catch_up()
            else:
                delay = min(delay * 2, _MAX_BACKOFF)
                self._spill(keep=self.settings.history_buffer_max)

    def flush_once(self, *, whole_batches: bool = False) -> bool:
        """Write everything buffered; False (and nothing lost) if the database did not take it.

        ``whole_batches``: write only full batches, leaving the rest for the next interval (a
        busy producer that chased its buffer's tail would write it a few rows at a time, each
        write costing about as much as a full batch).
        """
        self._ship_reports()
        size = self.settings.history_batch_size
        while True:
            with self._lock:
                if whole_batches and len(self._buffer) < size:
                    return True
                batch = list(islice(self._buffer, size))
                # reports go with the last batch: after the starts of their attempts
                last = len(batch) == len(self._buffer)
                reports = list(self._reports.values()) if last else []
                if not batch and not reports:
                    self._forget_ahead()
                    return True
            if not self.write(batch + reports):
                return False
            with self._lock:
                for _ in batch:
                    self._buffer.popleft()
                for report in reports:
                    if self._reports.get(report.job_id) is report:
                        del self._reports[report.job_id]

    def write(self, batch: list[Transition]) -> bool:
        """Write ``batch`` in one transaction; False (logged, counted) if the database failed."""
        try:
            sessions = self._session_factory()
            with sessions.begin() as session:
                apply_transitions(session, batch)
        except Exception as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                logger.warning("history database unavailable (%s); %d transition(s) kept",
                               exc.__class__.__name__, len(self._buffer))  # fmt: skip
            return False
        if self.failures:
            logger.warning("history database is back after %d failed write(s)", self.failures)
            self.failures = 0
        self.written += len(batch)
        return True

    def write_all(self, transitions: list[Transition]) -> bool:
        """Write ``transitions`` a batch at a time; False as soon as a batch failed (the
        batches before it are written: writing them again changes nothing)."""
        size = self.settings.history_batch_size
        return all(self.write(transitions[start : start + size])
                   for start in range(0, len(transitions), size))  # fmt: skip

    def _session_factory(self) -> Any:
        if self._sessions is None:
            if self.settings.effective_database_url.startswith("sqlite"):
                prepare_embedded_database(self.settings)
            # a broken connection fails one write, which is retried: no ping per checkout
            self._engine = create_history_engine(self.settings, pool_pre_ping=False)
            self._sessions = session_factory(self._engine)
        return self._sessions

    def _spill(self, *, keep: int) -> None:
        with self._lock:
            excess = len(self._buffer) - keep
            spilled = [self._buffer.popleft() for _ in range(max(excess, 0))]
        if spilled:
            self.journal.append(spilled)

    def catch_up(self) -> None:
        """Write what this and stopped processes left in the journal."""
        for path in self.journal.claim():
            transitions = self.journal.read(path)
            if not self.write_all(transitions):
                self.journal.release(path)
                return
            self.journal.done(path)
            logger.info("history caught up %d transition(s) from %s", len(transitions), path.name)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the flusher and write what is left; journal it if the database is down."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self.flush_once():
            with self._lock:
                self._buffer.extend(self._reports.values())
                self._reports.clear()
            self._spill(keep=0)
        with self._lock:  # written or journaled: the write-ahead file is not needed any more
            self._forget_ahead()
            self._stop_shipping()  # what the segment holds is the writer process's to write
        if self._engine is not None:
            self._engine.dispose()

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer) + len(self._reports)


def prepare_embedded_database(settings: Settings) -> None:
    """Bring the embedded SQLite history to the current schema (one process at a time, and one
    thread at a time: Alembic's ``op`` and ``context`` are process-wide)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from tasks_platform.history.migrations import MIGRATING, upgrade  # noqa: PLC0415 - alembic

    with MIGRATING, (settings.data_dir / "history.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        upgrade(settings)


# -- one recorder per process and settings -------------------------------------------------------
_recorders: dict[Path, Recorder] = {}
#: the recorder of each settings object seen, so the hot path resolves no path (id -> both)
_by_settings: dict[int, tuple[Settings, Recorder]] = {}
_registry_lock = threading.Lock()


def recorder_for(settings: Settings) -> Recorder:
    known = _by_settings.get(id(settings))
    if known is not None and known[0] is settings:
        return known[1]
    key = settings.data_dir.resolve() / settings.effective_database_url
    with _registry_lock:
        recorder = _recorders.get(key)
        if recorder is None:
            recorder = _recorders[key] = Recorder(settings)
        _by_settings[id(settings)] = (settings, recorder)
        return recorder


def close_all() -> None:
    with _registry_lock:
        recorders = list(_recorders.values())
        _recorders.clear()
        _by_settings.clear()
    for recorder in recorders:
        recorder.close()


def _forget_after_fork() -> None:
    # a forked pool process starts afresh: its parent writes what it had buffered
    _recorders.clear()
    _by_settings.clear()


#: True in a worker's processes (main and pool, which inherit it): they write ahead
_in_worker = False
#: the worker (main process id) whose history writer process writes this process's history
_writer_owner: int | None = None
#: that writer process, in the worker's main process
_writer: WriterProcess | None = None


def _worker_starting(sender: Any = None, **_: Any) -> None:
    """In a worker's main process, before its pool starts: start its history writer."""
    global _in_worker, _writer_owner, _writer  # noqa: PLW0603 - facts about this process
    _in_worker = True
    settings = getattr(getattr(sender, "app", None), "settings", None)
    if not isinstance(settings, Settings) or _writer is not None:
        return
    if settings.history_enabled and settings.history_write_ahead:
        from tasks_platform.history.shipper import WriterProcess  # noqa: PLC0415 - imports us

        _writer = WriterProcess(settings).start()
        _writer_owner = _writer.owner


def forget_writer() -> None:
    """In the history writer process, a fork of the worker's main process: it writes the
    history itself, and is the writer of no worker."""
    global _writer_owner, _writer  # noqa: PLW0603 - facts about this process
    _writer_owner = _writer = None


def _worker_stopping(**_: Any) -> None:
    """In a worker's main process, once its pool has stopped: write what is left and let the
    writer process write everything (its segments are complete now)."""
    global _writer_owner, _writer  # noqa: PLW0603 - facts about this process
    close_all()
    writer, _writer = _writer, None
    if writer is not None and writer.owner == os.getpid():
        writer.stop()
        _writer_owner = None


signals.worker_init.connect(
    _worker_starting, weak=False, dispatch_uid="tasks-platform-history-worker"
)
signals.worker_shutdown.connect(
    _worker_stopping, weak=False, dispatch_uid="tasks-platform-history-writer"
)


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(close_all)


def record(app: PlatformCelery, transition: Transition) -> None:
    """Record ``transition`` for ``app`` (if its history is enabled)."""
    if app.settings.history_enabled:
        recorder_for(app.settings).record(transition)


# -- the signals ---------------------------------------------------------------------------------
_HOST = socket.gethostname()


def install(app: PlatformCelery) -> None:
    """Connect the recorder to Celery's signals for ``app`` (once per app)."""
    handlers = _Handlers(app)
    uid = f"tasks-platform-history-{id(app)}"
    for signal, handler in (
        (signals.before_task_publish, handlers.publishing),
        (signals.after_task_publish, handlers.published),
        (signals.task_prerun, handlers.prerun),
        (signals.task_retry, handlers.retried),
        (signals.task_success, handlers.succeeded),
        (signals.task_failure, handlers.failed),
        (signals.task_revoked, handlers.revoked),
        (job_progress, handlers.progressed),
        (signals.worker_process_shutdown, handlers.shutdown),
    ):
        signal.connect(handler, weak=False, dispatch_uid=uid)


class _Handlers:
    """Celery signal receivers that turn what happens to ``app``'s jobs into transitions."""

    def __init__(self, app: PlatformCelery) -> None:
        self.app = app
        self.started: dict[str, float] = {}  # job id -> monotonic start, in this process
        self.publish_times: dict[str, float] = {}  # job id -> when its publish began

    def ours(self, task: Any) -> bool:
        return getattr(task, "app", None) is self.app and self.app.settings.history_enabled

    def publishing(self, sender: Any = None, headers: Any = None, **_: Any) -> None:
        if PUBLISHING_APP.get() is not self.app:
            return  # another app's job, or one published by name (recorded when it starts)
        if headers and "id" in headers:  # a fast worker may start it before publish() returns
            self.publish_times[str(headers["id"])] = time.time()

    def published(self, sender: Any = None, headers: Any = None, body: Any = None,
                  routing_key: str | None = None, **_: Any) -> None:  # fmt: skip
        app = self.app
        if not headers or not app.settings.history_enabled or PUBLISHING_APP.get() is not app:
            return
        family = app.topology.family_of(routing_key or "")
        if family is None or int(headers.get("retries") or 0) > 0:
            self.publish_times.pop(str(headers.get("id")), None)
            return  # not one of ours, or a retry (recorded as retrying by the worker)
        args, kwargs = (body[0], body[1]) if isinstance(body, tuple | list) else ((), {})
        facts = job_facts(app, headers.get("task"), args, kwargs, headers)
        facts["queue"] = family
        at = self.publish_times.pop(str(headers["id"]), None) or time.time()
        record(app, Transition(str(headers["id"]), JobState.QUEUED, 1, at,
                               replays=_replays(headers), facts=facts))  # fmt: skip

    def prerun(self, sender: Any = None, task_id: str = "", args: Any = (), kwargs: Any = None,
               **_: Any) -> None:  # fmt: skip
        if not self.ours(sender):
            return
        request = sender.request
        self.started[task_id] = time.monotonic()
        facts = job_facts(self.app, sender.name, args, kwargs or {}, request.headers or {})
        facts.update(parent_id=request.parent_id, root_id=request.root_id, group_id=request.group)
        routing_key = str((request.delivery_info or {}).get("routing_key"))
        facts["queue"] = self.app.topology.family_of(routing_key)
        _emit(self.app, request, task_id, JobState.STARTED, facts)

    def retried(self, sender: Any = None, request: Any = None, reason: Any = None,
                **_: Any) -> None:  # fmt: skip
        if self.ours(sender) and request is not None:
            facts = error_facts(self.app, reason, None)
            facts["run_seconds"] = self._runtime(request.id)
            _emit(self.app, sender.request, request.id, JobState.RETRYING, facts)

    def succeeded(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        if self.ours(sender):
            request = sender.request
            task_id = request.id
            limit = self.app.settings.history_result_max_bytes
            facts = {"result": bounded(redact(result, sender_sensitive(sender)), limit),
                     "run_seconds": self._runtime(task_id), **token_facts(result)}  # fmt: skip
            _emit(self.app, request, task_id, JobState.SUCCEEDED, facts)

    def failed(self, sender: Any = None, task_id: str = "", exception: Any = None,
               einfo: Any = None, **_: Any) -> None:  # fmt: skip
        if self.ours(sender):
            facts = error_facts(self.app, exception, einfo)
            facts["run_seconds"] = self._runtime(task_id)
            _emit(self.app, sender.request, task_id, JobState.FAILED, facts)

    def revoked(self, sender: Any = None, request: Any = None, expired: bool = False,
                terminated: bool = False, **_: Any) -> None:  # fmt: skip
        if self.ours(sender) and request is not None:
            # terminated: stopped while running; otherwise it never ran
            state = JobState.EXPIRED if expired else JobState.CANCELLED
            if terminated:
                state = JobState.REVOKED
            attempt = int(getattr(request, "retries", 0) or 0) + 1
            # Celery sends a task Context here, whose custom headers are in ``headers``
            headers = getattr(request, "request_dict", None) or getattr(request, "headers", None)
            replays = _replays(headers)
            record(self.app, Transition(str(request.id), state, attempt, time.time(),
                                        replays=replays, worker=_HOST))  # fmt: skip

    def progressed(self, sender: Any = None, job_id: str = "", attempt: int = 1,
                   replays: int = 0, worker: str | None = None, percent: float = 0.0,
                   note: str | None = None, **_: Any) -> None:  # fmt: skip
        if self.ours(sender):
            facts = {"percent": percent, "progress_note": note}
            transition = Transition(job_id, JobState.STARTED, attempt, time.time(), replays=replays,
                                    worker=worker, facts=facts, report=True)  # fmt: skip
            recorder_for(self.app.settings).report(transition)

    def shutdown(self, **_: Any) -> None:
        close_all()

    def _runtime(self, task_id: str) -> float | None:
        begin = self.started.pop(task_id, None)
        return None if begin is None else time.monotonic() - begin


def _emit(app: PlatformCelery, request: Any, task_id: str, state: JobState,
          facts: dict[str, Any]) -> None:  # fmt: skip
    """Record ``state`` of the job ``request`` (the task's current request) is about."""
    attempt = int(request.retries or 0) + 1
    record(app, Transition(task_id, state, attempt, time.time(), replays=_replays(request.headers),
                           worker=request.hostname or _HOST, facts=facts))  # fmt: skip


def job_facts(app: PlatformCelery, name: str | None, args: Any, kwargs: Any,
              headers: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """What identifies a job, with its payload's secrets redacted."""
    task = app.tasks.get(name) if name else None
    sensitive = sender_sensitive(task)
    policy = task.effective_retry_policy() if isinstance(task, PlatformTask) else None
    return {
        "name": name,
        "args": redact(list(args or ()), sensitive),
        "kwargs": redact(dict(kwargs or {}), sensitive),
        "priority": headers.get(PRIORITY_HEADER),
        "tenant": headers.get("tenant"),
        "idempotency_key": headers.get("idempotency_key"),
        "retry_of": headers.get(RETRY_OF_HEADER),
        "parent_id": headers.get("parent_id"),
        "root_id": headers.get("root_id"),
        "group_id": headers.get("group"),
        "max_retries": policy.max_retries if policy else None,
    }


def token_facts(result: Any) -> dict[str, int]:
    """The LLM tokens a job's result says it used: an OpenAI-style ``usage`` mapping."""
    usage = result.get("usage") if isinstance(result, dict) else None
    if not isinstance(usage, dict):
        return {}
    facts = {}
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
            facts[key] = value
    return facts


def error_facts(app: PlatformCelery, exc: Any, einfo: Any) -> dict[str, Any]:
    exc = getattr(exc, "exc", exc)  # a Retry carries the failure that caused it
    limit = app.settings.history_result_max_bytes * 2
    return {
        "error_type": type(exc).__name__ if exc is not None else None,
        "error_message": bounded_text(str(exc) if exc is not None else None, limit),
        "error_traceback": bounded_text(str(einfo.traceback) if einfo else None, limit),
    }


def sender_sensitive(task: Any) -> tuple[str, ...]:
    return tuple(getattr(task, "sensitive", ()) or ())


def _replays(headers: Any) -> int:
    return int((headers or {}).get(REPLAYS_HEADER) or 0)
