"""Private Redis, RabbitMQ and PostgreSQL servers that a fault test may crash and restart.

The shared servers on the default ports serve every other test running meanwhile: they are
never stopped. Each private server runs on free loopback ports with its data in a folder of
its own, so that a test can SIGKILL it (a crash, the harshest stop) and start it again on the
same port and data, as a process supervisor would after a crash.

* Redis runs with ``appendonly yes`` and ``appendfsync always``: Redis answers a write only
  after it is in the append-only file and fsynced, so a crash loses no job whose publish was
  answered (``everysec`` may lose the last second of answered writes on a machine crash).
* RabbitMQ runs as a node of its own (``faults-<random>@localhost``) beside the shared one,
  with its own cookie, data, logs, config and ports; durable queues and persistent messages
  are recovered from disk after a crash.
* PostgreSQL is a cluster made by ``initdb`` (trust authentication, loopback only), run as
  the ``postgres`` system user when the tests run as root (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from glob import glob
from pathlib import Path
from typing import IO

import amqp

#: seconds a server may take to start (RabbitMQ takes 5-10 s on a loaded 2-core machine)
START_TIMEOUT = 90.0


class ServerUnavailable(RuntimeError):
    """A private server could not be started here (missing binary, failed start)."""


def free_port() -> int:
    """A TCP port nothing listens on right now (on the loopback interface)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _kill_group(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


class PrivateServer:
    """A server process in a session of its own; ``crash()`` SIGKILLs it, ``start()`` again."""

    name = "server"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        return _port_open(self.port)

    def start(self) -> None:
        """Start the server and wait until it serves; ServerUnavailable if it does not."""
        self._log = (self.folder / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.folder,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.crash()
                raise ServerUnavailable(f"private {self.name} did not start: {self.log_tail()}")
            time.sleep(0.2)

    def crash(self) -> None:
        """SIGKILL the server and everything it started (a crash: nothing is flushed)."""
        _kill_group(self.process)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop for good (at the end of the session)."""
        self.crash()

    def log_tail(self, size: int = 2000) -> str:
        logs = sorted(self.folder.rglob("*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text(errors="replace")[-size:] if logs else "(no log)"


class PrivateRedis(PrivateServer):
    """``redis-server`` with the append-only file on, fsynced on every write."""

    name = "redis"

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            raise ServerUnavailable("redis-server is not installed")
        super().__init__(folder)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--maxmemory-policy", "noeviction", "--daemonize", "no",
        ]  # fmt: skip

    def ready(self) -> bool:
        # answers PING only once it has loaded the append-only file
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection,
        ):
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
        return False


class PrivateRabbitMQ(PrivateServer):
    """A RabbitMQ node of its own: ``faults-<random>@localhost`` on free loopback ports."""

    name = "rabbitmq"

    def __init__(self, folder: Path) -> None:
        found = [p for p in ("/usr/lib/rabbitmq/bin/rabbitmq-server",) if os.access(p, os.X_OK)]
        server = found[0] if found else shutil.which("rabbitmq-server")
        if server is None:
            raise ServerUnavailable("rabbitmq-server is not installed")
        super().__init__(folder)
        self.server = server
        self.node = f"faults-{secrets.token_hex(4)}@localhost"
        self.dist_port = free_port()
        home = folder / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq-env.conf").write_text("")  # not the machine's (it names the node)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def command(self) -> list[str]:
        return [self.server]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        folder = self.folder
        env.update(
            HOME=str(folder / "home"),  # a cookie of its own (for rabbitmqctl, if needed)
            RABBITMQ_CONF_ENV_FILE=str(folder / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(folder / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(folder / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(folder / "log"),
            RABBITMQ_PID_FILE=str(folder / "rabbitmq.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def ready(self) -> bool:
        # the AMQP listener opens last in the boot; a handshake proves the node serves
        if not _port_open(self.port):
            return False
        connection = amqp.Connection(f"127.0.0.1:{self.port}", connect_timeout=5)
        try:
            connection.connect()
        except Exception:
            return False
        with contextlib.suppress(Exception):
            connection.close()
        return True


class PrivatePostgres(PrivateServer):
    """A PostgreSQL cluster of its own (``initdb``), on a free port, trust authentication."""

    name = "postgres"

    def __init__(self, folder: Path) -> None:
        found = sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            raise ServerUnavailable("PostgreSQL server binaries are not installed")
        super().__init__(folder)
        self.bin = Path(found[-1]).parent
        self.data = folder / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(folder, user="postgres")
        initdb = [*self.as_user, str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", "postgres", "-E", "UTF8", "--no-sync"]  # fmt: skip
        made = subprocess.run(initdb, capture_output=True, timeout=120, check=False)
        if made.returncode != 0:
            raise ServerUnavailable(f"initdb failed: {made.stderr.decode(errors='replace')}")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def command(self) -> list[str]:
        return [
            *self.as_user, str(self.bin / "postgres"), "-D", str(self.data),
            "-p", str(self.port), "-k", str(self.folder), "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off", "-c", "max_connections=200",
        ]  # fmt: skip

    def ready(self) -> bool:
        checked = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
             "postgres", "-q"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        return checked.returncode == 0

    def crash(self) -> None:
        if self.as_user:  # runuser may start it in a session of its own
            self._kill_postmaster()
        super().crash()

    def _kill_postmaster(self) -> None:
        """SIGKILL the postmaster (its backends then exit by themselves); wait until it is gone."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
