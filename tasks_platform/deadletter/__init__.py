"""Dead letters: how hopeless jobs reach ``<queue>.dead``, and the console to inspect them.

Every work queue ``Q`` has a dead-letter queue ``Q.dead`` bound to the exchange ``tasks.dead``.
When the worker gives up on a job (retries exhausted, permanent error, time limit, poison,
undecodable or unknown message) it publishes the *original* message body to ``tasks.dead``
with these headers added, waits for the broker to confirm, and only then acknowledges the
original::

    x-dead-reason          retries_exhausted | permanent_error | time_limit | poison | ...
    x-dead-exception-type  e.g. "ValueError"
    x-dead-exception       the exception message (bounded)
    x-dead-traceback       the traceback (bounded)
    x-dead-attempts        how many times the job ran
    x-dead-queue           the work queue it came from
    x-dead-at              unix time

A worker killed between the publish and the acknowledgement leaves a second copy behind
(at-least-once); both carry the same task id, so they are recognisable.

On RabbitMQ the work queues also carry ``x-dead-letter-exchange`` arguments, so that anything
the broker itself rejects without requeue or expires is dead-lettered by the broker (those
letters carry RabbitMQ's ``x-death`` header instead of ours). RabbitMQ cannot add headers
when it dead-letters, which is why the worker publishes the enriched copy itself.

Dead letters are grouped by their error fingerprint (job type, exception type, normalised
message: see :mod:`tasks_platform.fingerprint`); replay and purge act on one task id, one
queue, one group or everything, and each operation writes one entry to the audit log of the
history database: who, why, and which task ids.

Modules: :mod:`.letters` (the headers and what a letter says), :mod:`.publish` (dead-lettering
and replaying messages), :mod:`.groups` (grouping by fingerprint), :mod:`.console` (the
:class:`DeadLetters` operations).
"""

from __future__ import annotations

from tasks_platform.deadletter.console import DeadLetters
from tasks_platform.deadletter.groups import DeadLetterGroup, group_letters
from tasks_platform.deadletter.letters import (
    HEADER_PREFIX,
    DeadLetter,
    DeadReason,
    Death,
    read_letter,
)
from tasks_platform.deadletter.publish import (
    dead_letter,
    replay_headers,
    requeue_with_delivery,
    source_queue,
)
from tasks_platform.jobs.declaration import REPLAYS_HEADER

__all__ = [
    "HEADER_PREFIX",
    "REPLAYS_HEADER",
    "DeadLetter",
    "DeadLetterGroup",
    "DeadLetters",
    "DeadReason",
    "Death",
    "dead_letter",
    "group_letters",
    "read_letter",
    "replay_headers",
    "requeue_with_delivery",
    "source_queue",
]
