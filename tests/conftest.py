"""Fixtures shared by every test: real services, a clean namespace per test, real workers.

A service that cannot be reached skips the tests that need it, except under ``CI`` where it
fails them: CI never passes by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy

# Importing tasks_platform builds the default app from TASKS_* variables (and, for the embedded
# broker, creates its folders). Import it with none of the caller's variables and a throw-away
# data folder, so that the tests neither depend on nor write to the developer's environment.
_IMPORT_DATA_DIR = tempfile.mkdtemp(prefix="tasks-platform-tests-")
with pytest.MonkeyPatch.context() as _patch:
    for _name in [n for n in os.environ if n.startswith("TASKS_")]:
        _patch.delenv(_name)
    _patch.setenv("TASKS_DATA_DIR", _IMPORT_DATA_DIR)
    import tasks_platform  # noqa: F401 - registers the job families on every app

from tasks_platform import create_app
from tasks_platform.deadletter import DeadLetters
from tasks_platform.history import recorder
from tasks_platform.process import WorkerProcess
from tasks_platform.settings import Settings

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/1")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BROKER_URLS = {"embedded": None, "redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}
#: a Redis database of its own for tests with a short visibility timeout: kombu keeps one
#: unacked hash per database, and their workers' restore sweeps would hand out the running
#: jobs of tests that run meanwhile (the suite runs two files at a time)
SHORT_VISIBILITY_REDIS_URL = os.environ.get(
    "TEST_SHORT_VISIBILITY_REDIS_URL", "redis://127.0.0.1:6379/2"
)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_IMPORT_DATA_DIR, ignore_errors=True)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_service(name: str, url: str) -> None:
    """Skip (locally) or fail (in CI) when the service behind ``url`` does not answer."""
    parts = urlsplit(url.replace("postgresql+psycopg", "postgresql"))
    host, port = parts.hostname or "127.0.0.1", parts.port
    try:
        with socket.create_connection((host, port or 0), timeout=2):
            return
    except OSError as exc:
        message = f"{name} at {host}:{port} is unreachable ({exc})"
    if in_ci():
        pytest.fail(f"{message}; under CI a missing service is a failure, not a skip")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _no_tasks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; the developer's TASKS_* never leak in."""
    for name in list(os.environ):
        if name.startswith("TASKS_"):
            monkeypatch.delenv(name)


def stop_process(
    process: subprocess.Popen[Any], *, timeout: float, whole_group: bool = False
) -> None:
    """SIGTERM the process (or its whole process group); SIGKILL the group after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        if whole_group:
            os.killpg(process.pid, signal.SIGTERM)
        elif process.poll() is None:
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_for(
    predicate: Callable[[], Any], timeout: float, *, what: str, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def settled(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 10) -> Any:
    """What ``read()`` gives once ``done`` holds for it, or its last value after ``timeout``
    (for the assertion to show): each process writes a job's history on its own, so the last
    one in may be an earlier transition."""
    deadline = time.monotonic() + timeout
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


@dataclass
class Runs:
    """What a demo job wrote to its record file: one line per start and per success."""

    path: Path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split() for line in self.path.read_text().splitlines() if line.strip()]

    def starts(self, label: str | None = None) -> list[list[str]]:
        return [r for r in self.lines() if r[3] == "start" and (label is None or r[0] == label)]

    def dones(self, label: str | None = None) -> list[list[str]]:
        return [r for r in self.lines() if r[3] == "done" and (label is None or r[0] == label)]


@dataclass
class Platform:
    """One isolated deployment for one test: its own prefix (or folder), app and workers."""

    broker: str
    tmp_path: Path
    settings: Any
    app: Any
    workers: list[Any] = field(default_factory=list)
    #: an engine on the history database, for tests that read it
    history: Any = None

    def worker(self, *, start: bool = True, **options: Any) -> WorkerProcess:
        options.setdefault("log_file", self.tmp_path / f"worker-{len(self.workers)}.log")
        worker = WorkerProcess(self.settings, **options)
        self.workers.append(worker)
        if start:
            worker.start(self.app)
        return worker

    def task(self, name: str) -> Any:
        return self.app.tasks[name]

    def runs(self, name: str = "runs") -> Runs:
        return Runs(self.tmp_path / f"{name}.txt")

    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.app)

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("worker-*.log"))
        )


@contextmanager
def make_platform(broker: str, tmp_path: Path, **overrides: Any) -> Iterator[Platform]:
    url = BROKER_URLS[broker]
    if url is not None:
        require_service(broker, url)
    values: dict[str, Any] = {
        "broker_url": url,
        "data_dir": tmp_path / "data",
        "queue_prefix": f"t{uuid.uuid4().hex[:10]}-",
    }
    values.update(overrides)
    settings = Settings(**values)
    app = create_app(settings, set_as_current=False)
    with app.connection_for_write() as connection:
        channel = connection.channel()
        settings_topology = app.topology
        settings_topology.declare_all(channel)
        channel.close()
    platform = Platform(broker=broker, tmp_path=tmp_path, settings=settings, app=app)
    try:
        yield platform
    finally:
        for worker in platform.workers:
            worker.stop()
        recorder.close_all()  # write what this process recorded, and close its connections
        if url is not None:
            with app.connection_for_write() as connection:
                channel = connection.channel()
                app.topology.delete_all(channel)
                channel.close()
        app.close()


@pytest.fixture(params=["embedded", "redis", "rabbitmq"])
def platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    """A platform on each broker in turn."""
    with make_platform(request.param, tmp_path) as made:
        yield made


@pytest.fixture(params=["redis", "rabbitmq"])
def server_platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Platform]:
    """A platform on each server broker (priorities need one)."""
    with make_platform(request.param, tmp_path) as made:
        yield made


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A database URL whose tables live in a fresh PostgreSQL schema, dropped afterwards."""
    require_service("postgres", POSTGRES_URL)
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{name}"
    finally:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{name}" CASCADE'))
        engine.dispose()
