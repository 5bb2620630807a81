"""Serving the admin API as a user does (``tasks-platform api`` in its own process), for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from conftest import stop_process

from tasks_platform.api.tokens import create_token
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.process import settings_env
from tasks_platform.settings import Settings

CLI = [sys.executable, "-m", "tasks_platform"]
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    return env | settings_env(settings) | extra


def run_cli(settings: Settings, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=cli_env(settings, **extra), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def make_token(
    settings: Settings,
    role: str,
    *,
    name: str | None = None,
    tenant: str | None = None,
    expires_in: timedelta | None = None,
) -> tuple[str, str]:
    """A token made in this process: (its id, its secret)."""
    engine = create_history_engine(settings)
    try:
        with session_factory(engine)() as session:
            token, secret = create_token(
                session, name=name or f"test-{role}", role=role, tenant=tenant,
                expires_in=expires_in, actor="tests",
            )  # fmt: skip
            session.commit()
            return token.id, secret
    finally:
        engine.dispose()


@dataclass
class ServedApi:
    url: str
    process: subprocess.Popen[bytes]
    log_file: Path

    def client(self, secret: str | None = None) -> httpx.Client:
        headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@contextmanager
def serve_api(settings: Settings, log_file: Path) -> Iterator[ServedApi]:
    """``tasks-platform api`` on a free loopback port, until the block ends (then SIGTERM)."""
    port = free_port()
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            [*CLI, "api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=cli_env(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    served = ServedApi(f"http://127.0.0.1:{port}", process, log_file)
    try:
        _wait_live(served)
        yield served
    finally:
        stop_process(process, timeout=20)


def _wait_live(served: ServedApi) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with served.client() as client:
        while time.monotonic() < deadline:
            if served.process.poll() is not None:
                raise AssertionError(
                    f"the API exited ({served.process.returncode}):\n{served.log()}"
                )
            try:
                if client.get("/api/v1/live").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"the API did not answer in {START_TIMEOUT:.0f}s:\n{served.log()}")
