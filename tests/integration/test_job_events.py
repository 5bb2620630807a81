"""A worker's job events, on every broker: each one reaches monitors once; on Redis and RabbitMQ
many jobs' events to a message (published at most every ``event_flush_interval``, not on every
turn of the worker's event loop; the embedded broker's worker has no event loop and publishes
each event as it happens)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_platform, wait_for
from event_tap import EventTap

JOBS = 60


@pytest.mark.parametrize("broker", ["embedded", "redis", "rabbitmq"])
def test_every_job_event_reaches_monitors_once_many_jobs_to_a_message(
    broker: str, tmp_path: Path
) -> None:
    with make_platform(broker, tmp_path, event_flush_interval=0.2) as platform:
        if broker == "redis":
            assert platform.app.conf.broker_transport == "tasks_platform.redis_transport:Transport"
        with (
            EventTap(platform.app, "task-received") as received,
            EventTap(platform.app, "task-succeeded") as succeeded,
        ):
            platform.worker(concurrency=2)
            ids = {platform.task("demo.noop").delay().id for _ in range(JOBS)}

            def all_seen() -> bool:
                return ids <= {e["uuid"] for e in succeeded.seen}

            wait_for(all_seen, 60, what="a task-succeeded event of every job")
            assert ids <= {e["uuid"] for e in received.seen}
        mine = [e for e in succeeded.seen if e["uuid"] in ids]
        assert len(mine) == len(ids), "an event was published twice"
        assert all(e["hostname"] == mine[0]["hostname"] for e in mine)
        if broker == "embedded":
            return
        # each job sends three events (received, started, succeeded): one message per loop
        # turn would be well over a message per job
        events = 3 * JOBS
        assert succeeded.messages <= events / 5, (
            f"{succeeded.messages} messages carried the {events} job events"
        )
