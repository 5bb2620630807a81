"""Collapsing duplicate deliveries of a job by its publish id (worker side).

Some jobs may be published twice:
- an outbox job: the relay publishes at least once (a relay that dies between publishing and
  committing leaves its rows to be published again); each publish carries ``x-tasks-outbox``;
- a job with an idempotency key whose publish may or may not have reached the broker
  (:class:`~tasks_platform.errors.PublishNotConfirmed`): the next submission with the key
  publishes it again, and kombu's own retry after a connection lost mid-publish sends another
  try; each carries ``x-tasks-publish`` (:mod:`tasks_platform.intake`).

A redelivery of one message (a lost worker, a connection lost before the ack, Redis'
visibility timeout, a replay from the dead-letter queue) keeps its id. The first delivery of a
job records its publish id in the job's row (the outbox's, or the history's for a keyed job);
a delivery of another publish of the same job is then a duplicate: it is acknowledged and not
run, whether the first one is still running or finished.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Table

from tasks_platform.history.models import Job, OutboxMessage
from tasks_platform.jobs.declaration import PUBLISH_ID_HEADER
from tasks_platform.outbox.store import OUTBOX_HEADER, claim_delivery
from tasks_platform.outbox.submit import sessions_for

logger = logging.getLogger(__name__)

#: the header naming a message's publish, the table whose row keeps the first delivery a
#: worker took, and how a job comes to be published twice
_PUBLISHES: tuple[tuple[str, Table, str], ...] = (  # type: ignore[assignment]
    (OUTBOX_HEADER, OutboxMessage.__table__, "by the outbox relay"),
    (PUBLISH_ID_HEADER, Job.__table__, "(its first publish may have failed)"),
)


def is_duplicate(request: Any) -> bool:
    """True if ``request`` is another publish of a job a worker already took.

    Only first attempts are checked (a retry is published by the worker that ran the job). If
    the database does not answer the job runs: at least once.
    """
    headers = request.request_dict or {}
    if int(headers.get("retries") or 0) > 0:
        return False
    found = next(((headers[header], table, how) for header, table, how in _PUBLISHES
                  if headers.get(header)), None)  # fmt: skip
    if found is None:
        return False
    publish_id, table, how = found
    try:
        with sessions_for(request.app).begin() as session:
            first = claim_delivery(session, str(request.id), str(publish_id), table=table)
    except Exception as exc:
        logger.warning("could not check job %s for an earlier delivery (%s: %s); running it",
                       request.id, type(exc).__name__, exc)  # fmt: skip
        return False
    if first is False:
        logger.warning("job %s[%s] was published twice %s; this copy is acknowledged without "
                       "running", request.task.name, request.id, how)  # fmt: skip
        return True
    return False
