"""Durable intake: jobs written in the caller's database transaction, published by a relay.

``task.apply_in(session, ...)`` / ``task.delay_in(session, ...)`` and
``submit(name, payload, session=session)`` add the job to the outbox inside the caller's
SQLAlchemy transaction: rolled back with the business change, the job never runs; committed,
it runs, even if the broker is down at that moment. ``tasks-platform relay`` (or the relay
every worker runs) publishes it. Job types declared ``outbox=True`` (``payments.charge``)
take this path on every ``apply_async``, in a transaction of their own.

The outbox lives in the history database: the caller's session must be on that database.
Reading API for operators and the reconciler: :func:`pending`, :func:`is_pending`.
"""

from __future__ import annotations

from tasks_platform.outbox.store import CHANNEL, OUTBOX_HEADER, enqueue, is_pending, pending

__all__ = ["CHANNEL", "OUTBOX_HEADER", "enqueue", "is_pending", "pending"]
