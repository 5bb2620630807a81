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

A worker allowed more than one job in flight (``TASKS_PREFETCH_MULTIPLIER`` above 1, as in the
throughput profile) takes a batch per round trip instead of one job: when ``BRPOP`` returns a
message, one script (``FETCH_SCRIPT``) records it as unacknowledged, pops as many more as the
prefetch window has room for (at most ``FETCH_MAX``; the same lists in the same order as the
``BRPOP``) and records each of them as unacknowledged too, in the same atomic step; the
acknowledgements that wait leave with it. Every message popped that way is in the
unacknowledged hash before the script returns, so a worker killed at any point leaves it to
the visibility timeout, as kombu's one-by-one path does. An item that is not a kombu message
is pushed back where it was and ends the batch; the next ``BRPOP`` takes it as kombu does.
The messages are delivered one after the other; a worker told to stop (a solo pool runs each
job as it is delivered) gets no more of them, and the rest go back to the front of their
queues at once, as do those after a consumer that failed. A batch that runs long (a solo pool
runs its jobs one after the other, and the worker's timers wait meanwhile) renews the
visibility of the jobs still waiting, and sends the acknowledgements of those that ran, as
often as a worker renews its own leases (:func:`~tasks_platform.visibility.renewal_interval`),
so that no other worker's sweep hands them out again.
With the platform's default (prefetch 1) nothing changes: one ``BRPOP`` and one pipeline per
job.
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from celery.worker import state as worker_state
from kombu.transport import redis
from kombu.transport.virtual import base as virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from tasks_platform.visibility import renew_leases, renewal_interval

logger = logging.getLogger(__name__)
#: seconds an acknowledgement waits, at most, for the next message's round trip
ACK_DELAY = 0.01
#: messages one fetch takes beyond the one ``BRPOP`` returned, at most
FETCH_MAX = 63

#: KEYS: the unacknowledged hash, its index, then the lists to pop from, in order.
#: ARGV: the time; the tag and record of the message ``BRPOP`` returned; how many more to pop;
#: then the tags acknowledged since the last round trip.
#: Returns list, item, list, item ... for each message popped.
FETCH_SCRIPT = """
local unacked, index, now = KEYS[1], KEYS[2], ARGV[1]
for i = 5, #ARGV do
  redis.call('ZREM', index, ARGV[i])
  redis.call('HDEL', unacked, ARGV[i])
end
redis.call('ZADD', index, now, ARGV[2])
redis.call('HSET', unacked, ARGV[2], ARGV[3])
local want, taken = tonumber(ARGV[4]), {}
for k = 3, #KEYS do
  while want > 0 do
    local item = redis.call('RPOP', KEYS[k])
    if not item then break end
    local ok, message = pcall(cjson.decode, item)
    local tag, info
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      tag, info = message.properties.delivery_tag, message.properties.delivery_info
    end
    if type(tag) ~= 'string' or type(info) ~= 'table' then
      redis.call('RPUSH', KEYS[k], item)
      return taken
    end
    redis.call('ZADD', index, now, tag)
    redis.call('HSET', unacked, tag, '[' .. item .. ',' .. cjson.encode(info.exchange) .. ','
               .. cjson.encode(info.routing_key) .. ']')
    taken[#taken + 1] = KEYS[k]
    taken[#taken + 1] = item
    want = want - 1
  end
end
return taken
"""


class QoS(redis.QoS):
    """Kombu's, with acknowledgements sent along with the next message's bookkeeping."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._acks: list[str] = []
        self._flush_due = False
        #: tags a fetch recorded as unacknowledged, not yet handed to the consumer
        self.fetched: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.fetched:  # already on the books: the fetch recorded it
            self.fetched.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        acks, self._acks = self._acks, []
        try:
            room = self.channel.fetch_room
            if room:
                self.channel.fetch(delivery_tag, record, room, acks)
                virtual.QoS.append(self, message, delivery_tag)
                return
            with self.pipe_or_acquire() as pipe:
                for tag in acks:
                    self._remove_from_indices(tag, pipe)  # type: ignore[no-untyped-call]
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
                pipe.hset(self.unacked_key, delivery_tag, record)
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
    _fetch_script: Any = None
    #: messages the message ``BRPOP`` is returning may bring along (set while it is read)
    fetch_room = 0
    #: (queue, message) popped by the last fetch, delivered once ``BRPOP``'s message is
    _fetched: list[tuple[str, Any]] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client

    def _brpop_read(self, **options: Any) -> Any:
        self.fetch_room = self._room()
        # the batch's leases run from its fetch, renewed as often as a worker renews its own
        interval = renewal_interval(self.visibility_timeout)
        renew_at = time() + interval
        try:
            got = super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        except BaseException:
            self._hand_back(self._take_fetched())
            raise
        finally:
            self.fetch_room = 0
        fetched, delivered = self._take_fetched(), 0
        try:
            for queue, message in fetched:
                if _stopping():  # a solo pool runs each job as it is delivered: stop between
                    break
                if time() >= renew_at:  # the batch runs long: keep what waits from the sweep
                    self.qos.flush_acks()  # those that ran: their timer waits too
                    renew_leases(
                        self, [m["properties"]["delivery_tag"] for _, m in fetched[delivered:]]
                    )
                    renew_at = time() + interval
                delivered += 1
                self.connection._deliver(message, queue)
        finally:
            self._hand_back(fetched[delivered:])
        return got

    def _room(self) -> int:
        if self.global_keyprefix:  # the script's keys would need the prefix: kombu's path
            return 0
        room = self.qos.can_consume_max_estimate()
        return min(room - 1, FETCH_MAX) if room and room > 1 else 0

    def fetch(self, delivery_tag: str, record: str, room: int, acks: list[str]) -> None:
        """Record ``BRPOP``'s message as unacknowledged; pop up to ``room`` more, recorded too."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        lists = [self._q_for_pri(queue, pri)  # type: ignore[no-untyped-call]
                 for pri in self.priority_steps for queue in queues]  # fmt: skip
        with self.conn_or_acquire() as client:
            if self._fetch_script is None:
                self._fetch_script = client.register_script(FETCH_SCRIPT)
            taken = self._fetch_script(
                keys=[self.unacked_key, self.unacked_index_key, *lists],
                args=[time(), delivery_tag, record, room, *acks],
                client=client,
            )
        fetched = []
        for at in range(0, len(taken), 2):
            message = loads(bytes_to_str(taken[at + 1]))
            self.qos.fetched.add(message["properties"]["delivery_tag"])
            fetched.append((bytes_to_str(taken[at]).rsplit(self.sep, 1)[0], message))
        self._fetched = fetched

    def _take_fetched(self) -> list[tuple[str, Any]]:
        fetched, self._fetched = self._fetched or [], None
        return fetched

    def _hand_back(self, fetched: list[tuple[str, Any]]) -> None:
        """Messages a fetch took that no consumer got (one failed): back to the front of their
        queues now, rather than after the visibility timeout."""
        for _, message in reversed(fetched):
            tag = message["properties"]["delivery_tag"]
            self.qos.fetched.discard(tag)
            try:
                self.qos.restore_by_tag(tag)
            except Exception:
                logger.exception("job %s stays unacknowledged until the visibility timeout: "
                                 "it could not be handed back", tag)  # fmt: skip


def _stopping() -> bool:
    """The worker was told to stop (its event loop stops at its next turn)."""
    stop, terminate = worker_state.should_stop, worker_state.should_terminate
    return (stop is not None and stop is not False) or (
        terminate is not None and terminate is not False
    )


class Transport(redis.Transport):
    Channel = Channel
    #: the worker's event loop, once the transport runs in one
    event_loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[no-untyped-call]
        self.event_loop = loop


#: what ``broker_transport`` names
TRANSPORT = f"{__name__}:Transport"
