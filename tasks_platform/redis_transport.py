"""The Redis transport: kombu's, with one client object per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` object for every command it sends outside
its consumer connection: each publish, each monitoring event, each acknowledgement's pipeline.
Building one costs about 50 µs of CPU (its table of reply parsers is made anew each time), and
a worker's main process does it several times per job: on short jobs that process is the
bottleneck. A ``redis.Redis`` object holds no connection of its own (each command takes one
from the channel's pool and gives it back), so one object serves every command and every
thread of the channel. It is built again when the channel replaces its pool (after a
connection error); the consumer's own client, the one waiting in ``BRPOP``, is kombu's as
before.

In a worker (a channel whose transport runs in an event loop) an acknowledgement does not
make a round trip of its own: it is taken off the channel's books at once (so the next
message can be fetched), and its removal from the unacknowledged hash leaves with the next
message's bookkeeping, in the same ``MULTI``/``EXEC``, or after ``ACK_DELAY`` when no message
comes. That is one round trip per job instead of two. A worker killed within those
milliseconds leaves the job in the hash, and it is handed out again after the visibility
timeout: at least once, as for a worker killed before it acknowledged. Closing the channel
(a warm shutdown) sends what waits first.

``celeryconfig`` selects this transport for ``redis://`` broker URLs; ``rediss://`` keeps
kombu's (its TLS checks look at the URL scheme).
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from kombu.transport import redis
from kombu.transport.virtual import base as virtual
from kombu.utils.json import dumps

logger = logging.getLogger(__name__)
#: seconds an acknowledgement waits, at most, for the next message's round trip
ACK_DELAY = 0.01


class QoS(redis.QoS):
    """Kombu's, with acknowledgements sent along with the next message's bookkeeping."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._acks: list[str] = []
        self._flush_due = False

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        acks, self._acks = self._acks, []
        try:
            with self.pipe_or_acquire() as pipe:
                for tag in acks:
                    self._remove_from_indices(tag, pipe)  # type: ignore[no-untyped-call]
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
                pipe.hset(
                    self.unacked_key,
                    delivery_tag,
                    dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
                )
                pipe.execute()
        except Exception:
            self._acks[:0] = acks  # sent with the next round trip
            raise
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        loop = getattr(self.channel.connection, "event_loop", None)
        if loop is None:  # not in a worker's event loop: as kombu does
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]
            return
        self._acks.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)
        if not self._flush_due:
            self._flush_due = True
            loop.call_later(ACK_DELAY, self.flush_acks)

    def flush_acks(self) -> None:
        """Send the acknowledgements that wait (a failure keeps them for the next try)."""
        self._flush_due = False
        acks, self._acks = self._acks, []
        if not acks:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                for tag in acks:
                    self._remove_from_indices(tag, pipe)  # type: ignore[no-untyped-call]
                pipe.execute()
        except Exception:
            self._acks[:0] = acks
            logger.exception("acknowledging %d job(s) failed; tried again with the next", len(acks))

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        transport = self.channel.connection
        if transport is None or transport.client is None:
            # the connection was lost and is being collected: nothing can be sent (kombu
            # would fail on its missing URL and stop the worker). The jobs are still in
            # Redis's unacknowledged hash, which hands them out again after the timeout.
            logger.warning("broker connection lost with %d job(s) unacknowledged: handed out "
                           "again after the visibility timeout",
                           len(self._delivered) + len(self._acks))  # fmt: skip
            return None
        self.flush_acks()  # what finished is acknowledged before the rest is handed back
        return super().restore_unacked_once(stderr)  # type: ignore[no-untyped-call]


class Channel(redis.Channel):
    QoS = QoS

    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(redis.Transport):
    Channel = Channel
    #: the worker's event loop, once the transport runs in one
    event_loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[no-untyped-call]
        self.event_loop = loop


#: what ``broker_transport`` names
TRANSPORT = f"{__name__}:Transport"
