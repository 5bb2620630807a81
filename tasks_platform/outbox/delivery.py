"""Collapsing duplicate deliveries of an outbox job by its task id (worker side).

The relay publishes at least once: a relay that dies between publishing and committing leaves
its rows to be published again. Every publish carries a fresh id (``x-tasks-outbox``), and a
redelivery of one message (a lost worker, a connection lost before the ack, Redis' visibility
timeout, a replay from the dead-letter queue) keeps it. The first delivery of a job records its
publish id in the job's outbox row; a delivery of another publish of the same job is then a
duplicate: it is acknowledged and not run, whether the first one is still running or finished.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks_platform.outbox.store import OUTBOX_HEADER, claim_delivery
from tasks_platform.outbox.submit import sessions_for

logger = logging.getLogger(__name__)


def is_duplicate(request: Any) -> bool:
    """True if ``request`` is another publish of an outbox job a worker already took.

    Only first attempts published by the relay are checked (a retry is published by the
    worker that ran the job). If the database does not answer the job runs: at least once.
    """
    headers = request.request_dict or {}
    publish_id = headers.get(OUTBOX_HEADER)
    if not publish_id or int(headers.get("retries") or 0) > 0:
        return False
    try:
        with sessions_for(request.app).begin() as session:
            first = claim_delivery(session, str(request.id), str(publish_id))
    except Exception as exc:
        logger.warning("could not check job %s for an earlier delivery (%s: %s); running it",
                       request.id, type(exc).__name__, exc)  # fmt: skip
        return False
    if first is False:
        logger.warning("job %s[%s] was published twice by the outbox relay; this copy is "
                       "acknowledged without running", request.task.name, request.id)  # fmt: skip
        return True
    return False
