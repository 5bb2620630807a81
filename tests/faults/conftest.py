"""Fixtures of the fault-injection suite: private servers a test may crash and restart.

Each fixture starts its server once per test session (per xdist process) on free loopback
ports, with its data in a temporary folder, and stops it at the end. A server that cannot be
started here skips the tests that need it, except under ``CI`` where it fails them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import in_ci

from faults.servers import (
    PrivatePostgres,
    PrivateRabbitMQ,
    PrivateRedis,
    PrivateServer,
    ServerUnavailable,
)


def _running(make: Callable[[], PrivateServer]) -> Iterator[PrivateServer]:
    try:
        server = make()
        server.start()
    except (ServerUnavailable, OSError) as exc:
        message = f"cannot start a private server for the fault tests: {exc}"
        if in_ci():
            pytest.fail(f"{message}; under CI this is a failure, not a skip")
        pytest.skip(message)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    """A Redis of this session's own (AOF on, fsync on every write), free to crash."""
    folder = tmp_path_factory.mktemp("private-redis")
    yield from _running(lambda: PrivateRedis(folder))


@pytest.fixture(scope="session")
def private_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    """A RabbitMQ node of this session's own, free to crash."""
    folder = tmp_path_factory.mktemp("private-rabbitmq")
    yield from _running(lambda: PrivateRabbitMQ(folder))


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivateServer]:
    """A PostgreSQL cluster of this session's own, free to crash.

    Its folder is made directly under the temporary directory: when the tests run as root the
    server runs as ``postgres``, which cannot enter pytest's (private) temporary folders.
    """
    folder = Path(tempfile.mkdtemp(prefix="tasks-platform-faults-pg-"))
    try:
        yield from _running(lambda: PrivatePostgres(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
