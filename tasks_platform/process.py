"""Running a real ``celery worker`` as a child process (the demo and the tests use this)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

from pydantic import SecretStr

from tasks_platform.history.shipper import PROCESS_NAME as WRITER_NAME
from tasks_platform.settings import Settings

READY_TIMEOUT = 60.0


def settings_env(settings: Settings) -> dict[str, str]:
    """``TASKS_*`` variables that reproduce ``settings`` in another process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="python").items():
        if isinstance(value, SecretStr):  # str() would give the mask, not the secret
            env[f"TASKS_{name.upper()}"] = value.get_secret_value()
        elif isinstance(value, dict | list):  # read back as JSON
            env[f"TASKS_{name.upper()}"] = json.dumps(value)
        elif value is not None:
            env[f"TASKS_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """``celery -A tasks_platform worker`` in a child process, with the given settings."""

    def __init__(
        self,
        settings: Settings,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        queues: list[str] | None = None,
        log_file: Path | None = None,
        loglevel: str = "INFO",
        extra_env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.nodename = f"worker-{uuid.uuid4().hex[:8]}@localhost"
        self.concurrency = concurrency
        self.pool = pool
        self.queues = queues
        self.log_file = log_file
        self.loglevel = loglevel
        self.extra_env = extra_env or {}
        #: what runs celery's command line (fault-injection tests wrap it)
        self.launcher = launcher or [sys.executable, "-m", "celery"]
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        command = [
            *self.launcher, "-A", "tasks_platform", "worker",
            "-n", self.nodename, "-c", str(self.concurrency), "-P", self.pool,
            "-l", self.loglevel, "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        if self.queues:
            command += ["-Q", ",".join(self.settings.queue_prefix + q for q in self.queues)]
        return command

    def start(self, app: Any = None, *, wait: bool = True) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        if self.log_file is not None:
            self._log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            env=env,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait and app is not None:
            self.wait_ready(app)
        return self

    def wait_ready(self, app: Any, timeout: float = READY_TIMEOUT) -> None:
        """Block until the worker answers a ping (it consumes from then on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with code {self.process.returncode}")
            replies = app.control.ping(destination=[self.nodename], timeout=0.5)
            if replies:
                return
        raise TimeoutError(f"worker {self.nodename} not ready after {timeout:.0f}s")

    @property
    def pid(self) -> int:
        assert self.process is not None, "worker not started"
        return self.process.pid

    def child_pids(self) -> list[int]:
        """Pids of the pool processes (the main process's children but its history writer)."""
        return [pid for pid in self._children() if process_name(pid) not in (None, WRITER_NAME)]

    def writer_pids(self) -> list[int]:
        """Pid of the history writer process (one, if the history is written ahead)."""
        return [pid for pid in self._children() if process_name(pid) == WRITER_NAME]

    def _children(self) -> list[int]:
        """Pids of the main process's children (forked by any of its threads)."""
        pids = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                pids += [int(pid) for pid in (task / "children").read_text().split()]
            except OSError:
                continue
        return sorted(pids)

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool), as a host crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close_log()

    def stop(self, timeout: float = 20.0) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL if it does not exit in ``timeout`` seconds."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # pool processes left by a crash
            os.killpg(process.pid, signal.SIGKILL)
        self._close_log()
        return process.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_name(pid: int) -> str | None:
    """The process's name (``comm``); None once it has ended (gone, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 1 :]
    return None if rest.split()[0] in ("Z", "X") else name
