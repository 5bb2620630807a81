"""``tasks-platform flower``, run as an operator runs it: a real Flower on a loopback port."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_platform, stop_process, wait_for

from tasks_platform.process import settings_env
from tasks_platform.settings import Settings

CLI = [sys.executable, "-m", "tasks_platform"]
USER, PASSWORD = "ops", "flower-test-secret"
CREDENTIALS = {"TASKS_FLOWER_USER": USER, "TASKS_FLOWER_PASSWORD": PASSWORD}
START_TIMEOUT = 60.0


def _environment(env: dict[str, str]) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("TASKS_", "FLOWER_"))}
    return inherited | env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class Flower:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def get(self, path: str, *, auth: tuple[str, str] | None = None) -> Response:
        headers = {}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            return Response(response.status, response.read())
        finally:
            connection.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _healthy(flower: Flower) -> bool:
    if flower.process.poll() is not None:
        raise AssertionError(
            f"flower exited with code {flower.process.returncode}:\n{flower.output()}"
        )
    try:
        return flower.get("/healthcheck").status == 200
    except OSError:
        return False


@contextlib.contextmanager
def _flower(env: dict[str, str], tmp_path: Path, *args: str) -> Iterator[Flower]:
    port = _free_port()
    log = tmp_path / f"flower-{port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*CLI, "flower", "--port", str(port), *args],
            env=_environment(env),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    flower = Flower(process, port, log)
    try:
        wait_for(lambda: _healthy(flower), START_TIMEOUT, what="flower to answer", interval=0.2)
        yield flower
    finally:
        stop_process(process, timeout=10, whole_group=True)


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "flower", *args],
        env=_environment(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _succeeded(flower: Flower, job_id: str) -> bool:
    tasks = flower.get("/api/tasks", auth=(USER, PASSWORD))
    assert tasks.status == 200, tasks.body
    listed = tasks.json()
    assert isinstance(listed, dict)
    return listed.get(job_id, {}).get("state") == "SUCCESS"


@pytest.mark.parametrize("broker", ["redis", "rabbitmq", "embedded"])
def test_flower_answers_its_api_with_the_credentials_and_refuses_without(
    broker: str, tmp_path: Path
) -> None:
    with make_platform(broker, tmp_path) as platform:
        worker = platform.worker(concurrency=1, pool="threads")
        env = settings_env(platform.settings) | CREDENTIALS
        with _flower(env, tmp_path) as flower:
            assert flower.get("/api/workers").status == 401
            assert flower.get("/api/workers", auth=(USER, "wrong-password")).status == 401
            assert flower.get("/api/tasks").status == 401
            assert flower.get("/", auth=("someone", PASSWORD)).status == 401

            # Flower binds its event queue a moment after it listens, and events sent before
            # that are lost: submit a job every few seconds until Flower has seen one through
            submitted: list[tuple[str, float]] = []

            def seen() -> bool:
                if not submitted or time.monotonic() - submitted[-1][1] > 5:
                    job = platform.task("demo.work").delay(label="watched")
                    submitted.append((job.id, time.monotonic()))
                return any(_succeeded(flower, job_id) for job_id, _ in submitted)

            wait_for(seen, 60, what="flower to see a job", interval=0.5)
            workers = flower.get("/api/workers?refresh=1", auth=(USER, PASSWORD))
            assert workers.status == 200, workers.body
            assert worker.nodename in workers.json()  # type: ignore[operator]
            assert flower.get("/", auth=(USER, PASSWORD)).status == 200

            cmdline = Path(f"/proc/{flower.process.pid}/cmdline").read_bytes()
            assert b"flower" in cmdline
            assert PASSWORD.encode() not in cmdline  # the secret is not on the command line
            output = flower.output()
            assert f"starting Flower on http://127.0.0.1:{flower.port}/ (basic auth)" in output
            assert ("note: embedded broker:" in output) == (broker == "embedded")


def test_flower_without_credentials_refuses_to_start(tmp_path: Path) -> None:
    env = settings_env(Settings(data_dir=tmp_path / "data"))
    port = _free_port()

    refused = _run(env, "--port", str(port))

    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == (
        "error: Flower needs credentials: set TASKS_FLOWER_USER and TASKS_FLOWER_PASSWORD "
        "(basic auth), or pass --insecure-dev for a local development run without them"
    )
    assert not _listening(port)

    half = _run(env | {"TASKS_FLOWER_USER": USER}, "--port", str(port))
    assert half.returncode == 2
    assert "TASKS_FLOWER_PASSWORD is not set" in half.stderr

    weak = _run(env | {"TASKS_FLOWER_USER": USER, "TASKS_FLOWER_PASSWORD": "1234"})
    assert weak.returncode == 2
    assert "TASKS_FLOWER_PASSWORD is too short" in weak.stderr

    exposed = _run(env, "--insecure-dev", "--address", "0.0.0.0", "--port", str(port))
    assert exposed.returncode == 2
    assert "only on a loopback address" in exposed.stderr
    assert not _listening(port)


def test_flower_insecure_dev_run_starts_without_credentials(tmp_path: Path) -> None:
    env = settings_env(Settings(data_dir=tmp_path / "data"))

    with _flower(env, tmp_path, "--insecure-dev") as flower:
        assert flower.get("/").status == 200  # the pages need no password
        assert flower.get("/api/workers").status == 401  # Flower keeps its API closed
        output = flower.output()
        assert "(NO authentication)" in output
        assert "note: insecure dev run" in output
