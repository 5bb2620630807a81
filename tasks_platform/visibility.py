"""Redis visibility leases: a live worker keeps the jobs it holds from being handed out again.

On Redis, a message delivered to a worker sits in kombu's *unacked* hash, indexed by delivery
time in the ``unacked_index`` sorted set, until the worker acknowledges it. Every worker sweeps
that index and puts back in its queue any message delivered more than ``visibility_timeout``
seconds ago: that is how the job of a worker that died is delivered again. But the sweep
cannot tell a dead worker from a slow job: a job running (or waiting in a worker's prefetch,
or held for its countdown) longer than the visibility timeout is delivered a second time while
the first run goes on, and again every timeout after: a redelivery storm of long jobs.

:class:`VisibilityLease` (a worker bootstep, Redis only) renews the lease of every job its
worker holds, running, reserved or scheduled (countdown/ETA): every quarter of the visibility
timeout it moves their delivery time in ``unacked_index`` to now (``ZADD XX``: a job
acknowledged meanwhile is not brought back). A worker that dies stops renewing, and its jobs
are delivered again one visibility timeout later, as before. A worker cut off from Redis cannot
renew either: its jobs may then run twice (at-least-once; idempotency keys make that safe).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

from celery import bootsteps
from celery.worker import state

from tasks_platform.settings import BrokerKind

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)

#: renewals per visibility timeout (a lease is renewed well before it runs out)
RENEWALS_PER_TIMEOUT = 4
#: the shortest time between two renewals (seconds)
MIN_INTERVAL = 0.5


def renewal_interval(visibility_timeout: float) -> float:
    """Seconds between two renewals of a worker's leases."""
    return max(visibility_timeout / RENEWALS_PER_TIMEOUT, MIN_INTERVAL)


def held_delivery_tags() -> list[str]:
    """Delivery tags of the jobs this worker holds: running, reserved, waiting for their ETA."""
    tags = set()
    for requests in (state.active_requests, state.reserved_requests, state.scheduled_requests):
        for request in list(requests):
            tag = (getattr(request, "delivery_info", None) or {}).get("delivery_tag")
            if tag is None:
                tag = getattr(getattr(request, "message", None), "delivery_tag", None)
            if tag is not None:
                tags.add(str(tag))
    return sorted(tags)


class VisibilityLease(bootsteps.StartStopStep):  # type: ignore[misc]
    """Renews the Redis visibility of the jobs this worker holds (see the module docstring)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.app = cast("PlatformCelery", c.app)
        self._timer: Any = None

    def include_if(self, c: Any) -> bool:
        return self.app.settings.broker_kind is BrokerKind.REDIS

    def start(self, c: Any) -> None:
        interval = renewal_interval(self.app.settings.visibility_timeout)
        self._timer = c.timer.call_repeatedly(interval, self.renew, (c,))

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def renew(self, c: Any) -> int:
        """Move the delivery time of every held job to now; how many leases were renewed."""
        tags = held_delivery_tags()
        if not tags:
            return 0
        return renew_leases(c.task_consumer.channel, tags)


def renew_leases(channel: Any, tags: list[str]) -> int:
    """Move the delivery time of the jobs ``tags`` names in kombu's unacknowledged index (of
    ``channel``, a Redis channel) to now, leaving out those acknowledged meanwhile; how many
    leases were renewed (0 when Redis could not be told: the next renewal tries again)."""
    try:
        # a pooled connection of its own: ``channel.client`` is the one waiting in BRPOP,
        # and a command sent on it would take BRPOP's reply (and stop the worker)
        with channel.conn_or_acquire() as client:
            renewed = client.zadd(channel.unacked_index_key, dict.fromkeys(tags, time.time()),
                                  xx=True, ch=True)  # fmt: skip
    except Exception:  # a broker outage is logged elsewhere
        logger.warning("could not renew the visibility of %d held job(s)", len(tags),
                       exc_info=True)  # fmt: skip
        return 0
    return int(renewed or 0)
