"""The worker's liveness file is fresh while it consumes, goes stale when its broker connection
is lost, is fresh again once it reconnects, and is gone once it has stopped."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

from conftest import REDIS_URL, make_platform, wait_for
from tcp_proxy import TcpProxy

INTERVAL = 0.5


def age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def test_liveness_file_is_touched_only_while_the_worker_consumes(tmp_path: Path) -> None:
    alive = tmp_path / "run" / "worker.alive"
    broker = urlsplit(REDIS_URL)
    with make_platform("redis", tmp_path, worker_liveness_file=alive,
                       worker_liveness_interval=INTERVAL) as platform:  # fmt: skip
        proxy = TcpProxy((broker.hostname or "127.0.0.1", broker.port or 6379)).start()
        try:
            through_proxy = broker._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
            worker = platform.worker(concurrency=1, pool="threads",
                                     extra_env={"TASKS_BROKER_URL": through_proxy})  # fmt: skip
            wait_for(alive.exists, 30, what="the liveness file")
            first = alive.stat().st_mtime
            wait_for(lambda: alive.stat().st_mtime > first, 10, what="the file touched again")

            proxy.cut()  # the worker loses its broker: the consumer stops, the touches too
            wait_for(lambda: age(alive) > 6 * INTERVAL, 30, what="the file to go stale")

            proxy.start()  # the worker reconnects on its own
            wait_for(lambda: age(alive) < 2 * INTERVAL, 60, what="the file to be fresh again")
            runs = platform.runs()
            platform.task("demo.work").delay(label="after", record_to=str(runs.path))
            wait_for(lambda: runs.dones("after"), 30, what="the worker to consume again")
        finally:
            proxy.cut()
            proxy.start()  # lets the worker's warm shutdown reach its broker
        assert worker.stop() == 0
        assert not alive.exists(), "a stopped worker leaves no liveness file behind"
