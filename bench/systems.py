"""The job systems bench/compare.py runs side by side, each on one broker.

A system fills its queue with no-op jobs, starts its workers and says how many jobs the broker
still holds (waiting, and delivered but unacknowledged where the broker tells):
:class:`Platform` (the platform, or its throughput profile), :class:`BareCelery`,
:class:`Dramatiq` and :class:`Rq`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from common import RABBITMQ_URL, worker_env
from sqlalchemy.pool import NullPool

from tasks_platform.application import PlatformCelery, create_app
from tasks_platform.bulk import submit_many
from tasks_platform.history import recorder
from tasks_platform.process import WorkerProcess
from tasks_platform.settings import Settings
from tasks_platform.stats.broker import redis_list_name
from tasks_platform.topology import REDIS_PRIORITY_STEPS

REDIS_URL = os.environ.get("BENCH_COMPARE_REDIS_URL", "redis://127.0.0.1:6379/13")
BROKERS = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}
BIN = Path(sys.executable).parent


@dataclass
class Workers:
    """Worker processes of one system (each in a session of its own)."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, command: list[str], env: dict[str, str], log: Path) -> None:
        with log.open("ab") as out:
            self.processes.append(subprocess.Popen(command, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))  # fmt: skip

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class System:
    """One job system on one broker: fill its queue, run its workers, count what is left."""

    label = ""
    max_jobs: int | None = None

    def __init__(self, broker: str, data: Path) -> None:
        self.broker, self.url, self.data = broker, BROKERS[broker], data
        self.queue = f"cmp-{uuid.uuid4().hex[:8]}"
        self.workers = Workers()
        self._probe: Any = None  # a kombu Connection, made at the first look (RabbitMQ)

    def enqueue(self, jobs: int) -> None:
        raise NotImplementedError

    def start_workers(self) -> None:
        raise NotImplementedError

    def outstanding(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the workers and remove the queues."""
        self.workers.stop()
        if self._probe is not None:
            self._probe.release()
            self._probe = None

    def _amqp_ready(self, queue: str) -> int:
        """Ready messages in ``queue``, asked on one connection kept for the run: a connection
        per look (every 10 ms during a drain) cost the broker more CPU than the drain left it."""
        if self._probe is None:
            from kombu import Connection  # noqa: PLC0415

            self._probe = Connection(self.url)
        channel = self._probe.default_channel
        return int(channel.queue_declare(queue=queue, passive=True).message_count)

    @contextmanager
    def _amqp(self) -> Iterator[Any]:
        from kombu import Connection  # noqa: PLC0415

        with Connection(self.url) as connection:
            yield connection.default_channel


class Platform(System):
    label = "platform"

    def __init__(self, broker: str, data: Path, database_url: str,
                 profile: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(broker, data)
        self.profile = profile
        overrides = {k.removeprefix("TASKS_").lower(): v
                     for k, v in (profile or {}).get("settings", {}).items()}  # fmt: skip
        self.settings = Settings(broker_url=self.url, database_url=database_url, data_dir=data,
                                 queue_prefix=f"{self.queue}-", **overrides)  # fmt: skip
        self.app: PlatformCelery = create_app(self.settings, set_as_current=False)
        with self.app.connection_for_write() as connection:
            self.app.topology.declare_all(connection.default_channel)
        self.queue_name = self.app.topology.queue_name("default")
        self._redis = redis.Redis.from_url(self.url) if broker == "redis" else None
        self.pool_workers: list[WorkerProcess] = []
        if profile:
            self.label = "platform, throughput profile"

    def enqueue(self, jobs: int) -> None:
        noop = self.app.tasks["demo.noop"]
        for _ in range(jobs):
            noop.delay()

    def enqueue_bulk(self, jobs: int) -> None:
        submit_many("demo.noop", [{}] * jobs, app=self.app)

    def flush_history(self) -> None:
        recorder.close_all()  # the producer's `queued` transitions, written before timing

    def wait_history(self, jobs: int, timeout: float = 120) -> float:
        """Seconds until the history shows ``jobs`` jobs succeeded (each drain starts on an
        empty history); an error if it never does: a job acknowledged but not run."""
        started = time.monotonic()
        engine = sa.create_engine(self.settings.effective_database_url, poolclass=NullPool)
        query = sa.text("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
        try:
            while True:
                with engine.connect() as connection:
                    done = int(connection.execute(query).scalar_one())
                if done >= jobs:
                    return time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"{self.label}: the history shows {done:,} of "
                                       f"{jobs:,} jobs succeeded {timeout:.0f} s after the "
                                       "drain")  # fmt: skip
                time.sleep(0.1)
        finally:
            engine.dispose()

    def start_workers(self) -> None:
        profile = self.profile or {"workers": 1, "pool": "prefork", "concurrency": 2, "args": []}
        for number in range(profile["workers"]):
            worker = BenchWorker(self.settings, concurrency=profile["concurrency"],
                                 pool=profile["pool"], loglevel="WARNING",
                                 queues=["default"] if self.profile else None,
                                 log_file=self.data / f"platform-{number}.log",
                                 extra_env={"PYTHONPATH": worker_env()["PYTHONPATH"]},
                                 extra_args=profile["args"])  # fmt: skip
            worker.start()
            self.pool_workers.append(worker)
        self.workers.processes = [w.process for w in self.pool_workers if w.process is not None]

    def outstanding(self) -> int:
        if self._redis is None:
            return self._amqp_ready(self.queue_name)
        with self._redis.pipeline() as pipe:
            for step in REDIS_PRIORITY_STEPS:
                pipe.llen(redis_list_name(self.queue_name, step))
            pipe.hlen("unacked")  # kombu's, per database: the bench's database is its own
            return int(sum(pipe.execute()))

    def purge(self) -> None:
        if self._redis is not None:
            self._redis.delete(*(redis_list_name(self.queue_name, s) for s in REDIS_PRIORITY_STEPS))
        else:
            with self._amqp() as channel:
                channel.queue_purge(self.queue_name)

    def close(self) -> None:
        for worker in self.pool_workers:
            worker.stop()
        recorder.close_all()
        if self._redis is not None:
            self._redis.delete("unacked", "unacked_index")
            delete_matching(self._redis, f"*{self.queue}*")  # kombu's bindings of the run
            self._redis.close()
        with self.app.connection_for_write() as connection:
            self.app.topology.delete_all(connection.default_channel)
        self.app.close()


class BenchWorker(WorkerProcess):
    """A platform worker that also loads the bench's job types (``bench.stamp``)."""

    def __init__(self, *args: Any, extra_args: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_args = list(extra_args or [])

    def command(self) -> list[str]:
        return [*super().command(), "--include", "platform_stamp", *self.extra_args]


class BareCelery(System):
    label = "bare Celery"

    def __init__(self, broker: str, data: Path) -> None:
        super().__init__(broker, data)
        from bare_celery import make_app  # noqa: PLC0415

        self.app = make_app(self.url, self.queue)
        self._redis = redis.Redis.from_url(self.url) if broker == "redis" else None

    def enqueue(self, jobs: int) -> None:
        noop = self.app.tasks["bare.noop"]
        for _ in range(jobs):
            noop.delay()

    def start_workers(self) -> None:
        env = worker_env({"BENCH_BROKER_URL": self.url, "BENCH_QUEUE": self.queue})
        self.workers.start([sys.executable, "-m", "celery", "-A", "bare_celery", "worker",
                            "-c", "2", "-P", "prefork", "-l", "WARNING", "-n",
                            f"bare-{self.queue}@localhost"],
                           env, self.data / "bare.log")  # fmt: skip

    def outstanding(self) -> int:
        if self._redis is None:
            return self._amqp_ready(self.queue)
        with self._redis.pipeline() as pipe:
            for step in REDIS_PRIORITY_STEPS:
                pipe.llen(redis_list_name(self.queue, step))
            pipe.hlen("unacked")
            return int(sum(pipe.execute()))

    def close(self) -> None:
        super().close()
        if self._redis is not None:
            delete_matching(self._redis, f"*{self.queue}*")  # its lists and kombu's bindings
            self._redis.close()
        else:
            with self._amqp() as channel:
                channel.queue_delete(self.queue)
        self.app.close()


class Dramatiq(System):
    label = "Dramatiq"

    def __init__(self, broker: str, data: Path) -> None:
        super().__init__(broker, data)
        self.queue = self.queue.replace("-", "_")
        from dramatiq_app import make_broker  # noqa: PLC0415

        self.dramatiq_broker, self.noop = make_broker(self.url, self.queue)
        self._redis = redis.Redis.from_url(self.url) if broker == "redis" else None

    def enqueue(self, jobs: int) -> None:
        for _ in range(jobs):
            self.noop.send()

    def start_workers(self) -> None:
        env = worker_env({"BENCH_BROKER_URL": self.url, "BENCH_QUEUE": self.queue})
        self.workers.start([sys.executable, "-m", "dramatiq", "dramatiq_app", "--processes", "2",
                            "--threads", "8"], env, self.data / "dramatiq.log")  # fmt: skip

    def outstanding(self) -> int:
        if self._redis is None:
            return self._amqp_ready(self.queue)
        return int(self._redis.hlen(f"dramatiq:{self.queue}.msgs"))  # acked: removed

    def close(self) -> None:
        super().close()
        if self._redis is not None:
            delete_matching(self._redis, f"dramatiq:*{self.queue}*")
            self._redis.close()
        else:
            with self._amqp() as channel:
                for name in (self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"):
                    channel.queue_delete(name)
        self.dramatiq_broker.close()


class Rq(System):
    label = "RQ"
    #: a fork per job: this many are plenty for a rate (jobs/s), and keep the run short
    max_jobs = 1000

    def __init__(self, broker: str, data: Path) -> None:
        super().__init__(broker, data)
        from rq import Queue  # noqa: PLC0415

        self._redis = redis.Redis.from_url(self.url)
        self.rq_queue = Queue(self.queue, connection=self._redis)

    def enqueue(self, jobs: int) -> None:
        from rq_jobs import noop  # noqa: PLC0415

        for _ in range(jobs):
            self.rq_queue.enqueue(noop)

    def start_workers(self) -> None:
        for number in range(2):
            self.workers.start([str(BIN / "rq"), "worker", "--url", self.url, "--quiet",
                                "--name", f"{self.queue}-{number}", self.queue],
                               worker_env(), self.data / f"rq-{number}.log")  # fmt: skip

    def outstanding(self) -> int:
        with self._redis.pipeline() as pipe:
            pipe.llen(f"rq:queue:{self.queue}")
            pipe.zcard(f"rq:wip:{self.queue}")
            return int(sum(pipe.execute()))

    def close(self) -> None:
        super().close()
        delete_matching(self._redis, f"*{self.queue}*")
        for pattern in ("rq:job:*", "rq:results:*"):  # RQ's per-job keys (the bench's database)
            delete_matching(self._redis, pattern)
        self._redis.close()


def delete_matching(client: redis.Redis, pattern: str) -> None:
    """Delete the keys matching ``pattern``, a thousand at a time."""
    keys = list(client.scan_iter(pattern, count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
