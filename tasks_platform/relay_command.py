"""``tasks-platform relay``: publish the jobs committed to the outbox (see tasks_platform.outbox).

Every worker already runs a relay (``TASKS_OUTBOX_RELAY``); this runs one on its own, e.g.
next to workers started with ``TASKS_OUTBOX_RELAY=false``. Several may run at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

import tasks_platform
from tasks_platform.outbox.relay import Relay


@click.command("relay")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=None,
              help="Jobs per transaction (default: TASKS_OUTBOX_BATCH_SIZE).")  # fmt: skip
@click.option("--once", is_flag=True, help="Publish what is pending now, then exit.")
def relay_command(batch_size: int | None, once: bool) -> None:
    """Publish the jobs waiting in the outbox, until stopped (SIGTERM or Ctrl-C)."""
    relay = Relay(tasks_platform.app, batch_size=batch_size)
    if once:
        try:
            published = relay.drain()
        finally:
            relay.close()
        click.echo(f"published {published} job(s) from the outbox")
        return
    stop = threading.Event()

    def stopping(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    click.echo("outbox relay running; SIGTERM or Ctrl-C stops it", err=True)
    relay.run(stop)
    stats = relay.stats
    click.echo(f"outbox relay stopped: published {stats.published} job(s) in {stats.rounds} "
               f"round(s), {stats.failures} failed round(s)", err=True)  # fmt: skip
