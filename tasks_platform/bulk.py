"""Bulk submission: many jobs of one type queued with pipelined publishes.

``submit_many("demo.work", payloads)`` (or ``task.delay_many(payloads)``) queues one job per
payload and returns their ids, in the order of the payloads. It is for producers that create
jobs by the thousand (an import, a fan-out, a nightly batch): one ``delay()`` waits for the
broker once per job, a bulk submission once per batch.

What it keeps from ``delay()``:

* every payload is validated first (schema, JSON, size limit), and so are the tenant, the
  priority and the idempotency keys: if any is invalid, :class:`InvalidPayload` names the
  first bad one (``payloads[3]: ...``) and **nothing** is queued;
* the messages are Celery's own (message protocol 2), routed to the job family's queue, with
  the broker priority, the ``x-tasks-priority`` and ``tenant`` headers, and the payload's
  secrets redacted from ``argsrepr``/``kwargsrepr``;
* each job's ``queued`` transition goes to the history (buffered and written in batches by the
  recorder), after its batch was accepted by the broker;
* an item with an idempotency key goes through the intake's once-per-key rule one by one (its
  id may then be an earlier job's), and so do all items of a tenant that has a rate limit on
  this job type (pacing): correct, but not faster than ``delay()``.

How it publishes: on Redis, each batch is one LPUSH of all its messages, one round trip, each
message in the envelope kombu's Redis channel reads, written by the platform (kombu would
build a message object, a delivery tag and three JSON texts per job: most of a bulk
submission's time); on RabbitMQ, each batch is written on a channel of its own in
publisher-confirm mode, :data:`WRITE_CHUNK` bytes at a time, and confirmed once (one wait for
the broker's acks), each message the one kombu's producer would have sent; a batch the broker
does not confirm raises :class:`PublishNotConfirmed`. The embedded file broker publishes one
message after another (it has no pipeline), with the same result.

What it does not do: it sends no ``task-sent`` monitoring events and no Celery publish signals
(``before/after_task_publish``): monitors see the jobs from ``task-received`` on, the history
has them from ``queued``.
If the broker fails mid-way, :class:`BrokerUnavailable` says so: the batches before the failing
one stay queued (their jobs are in the history), the failing batch may be queued in part.
"""

from __future__ import annotations

import os
import time
from base64 import b64encode
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from amqp import spec
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu.messaging import Producer
from kombu.utils import json as kombu_json

from tasks_platform import redis_transport
from tasks_platform.errors import BrokerUnavailable, InvalidPayload, PublishNotConfirmed
from tasks_platform.history import recorder
from tasks_platform.history.models import JobState
from tasks_platform.history.redaction import redact
from tasks_platform.history.writer import Transition
from tasks_platform.intake import check_key, declared_task
from tasks_platform.jobs.declaration import (
    PRIORITY_HEADER,
    REPR_MAX,
    TENANT_HEADER,
    PlatformTask,
    check_tenant,
)
from tasks_platform.settings import BrokerKind
from tasks_platform.submit import platform_app
from tasks_platform.topology import Priority

#: jobs per pipeline (Redis) or per confirm wait (RabbitMQ)
DEFAULT_BATCH_SIZE = 1000
#: RabbitMQ: bytes of a batch's messages written together (about 60 jobs' messages)
WRITE_CHUNK = 64 * 1024
#: seconds RabbitMQ has to confirm a batch
CONFIRM_TIMEOUT = 30.0


@dataclass(frozen=True)
class _Item:
    """One validated job, ready to publish."""

    index: int
    id: str
    kwargs: dict[str, Any]
    key: str | None


def submit_many(
    name: str,
    payloads: Iterable[Mapping[str, Any]],
    *,
    priority: Priority | str | None = None,
    tenant: str | None = None,
    countdown: float | None = None,
    idempotency_keys: Sequence[str | None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    app: Any = None,
) -> list[str]:
    """Queue one job ``name`` per payload; their ids, in order (see the module docstring).

    ``idempotency_keys``, if given, has one entry per payload (``None``: no key for that one).
    """
    task = declared_task(platform_app(app), name)
    return queue_many(task, payloads, priority=priority, tenant=tenant, countdown=countdown,
                      idempotency_keys=idempotency_keys, batch_size=batch_size)  # fmt: skip


def queue_many(
    task: PlatformTask,
    payloads: Iterable[Mapping[str, Any]],
    *,
    priority: Priority | str | None = None,
    tenant: str | None = None,
    countdown: float | None = None,
    idempotency_keys: Sequence[str | None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """``submit_many`` for a declared task (``task.delay_many`` calls this)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
    check_tenant(tenant)
    if countdown is not None and not (isinstance(countdown, int | float) and countdown >= 0):
        raise InvalidPayload(f"countdown must be a number of seconds >= 0, got {countdown!r}")
    broker_priority = task._broker_priority(priority)
    level = task.platform_priority if priority is None else Priority.parse(priority)
    items = _validate(task, list(payloads), idempotency_keys)
    settings = task.app.settings
    paced = bool(settings.tenant_limits) and settings.tenant_limit(tenant, task.name) is not None
    one_by_one = [item for item in items if item.key is not None or paced]
    fast = [item for item in items if not (item.key is not None or paced)]
    ids = {item.index: item.id for item in fast}
    headers: dict[str, Any] = {PRIORITY_HEADER: level.value}
    if tenant is not None:
        headers[TENANT_HEADER] = tenant
    for start in range(0, len(fast), batch_size):
        batch = fast[start : start + batch_size]
        try:
            _Batch(task, batch, headers, broker_priority, countdown).send()
        except Exception as exc:
            raise _broker_error(task.name, exc, done=start, batch=len(batch)) from exc
    for item in one_by_one:  # the intake's once-per-key rule, or the tenant's pacing
        result = task.apply_async(kwargs=item.kwargs, priority=level.value, tenant=tenant,
                                  countdown=countdown, idempotency_key=item.key)  # fmt: skip
        ids[item.index] = str(result.id)
    return [ids[index] for index in range(len(items))]


def _broker_error(name: str, exc: Exception, *, done: int, batch: int) -> Exception:
    """A failed batch as the platform's error: what is queued, what may be, what is not."""
    from kombu.exceptions import BatchPublishError, OperationalError  # noqa: PLC0415
    from redis.exceptions import ConnectionError as RedisDown  # noqa: PLC0415
    from redis.exceptions import TimeoutError as RedisTimeout  # noqa: PLC0415

    if isinstance(exc, PublishNotConfirmed):
        return exc
    unavailable = (BatchPublishError, OperationalError, RedisDown, RedisTimeout,
                   ConnectionError, TimeoutError)  # fmt: skip
    if isinstance(exc, unavailable):
        return BrokerUnavailable(
            f"could not publish a batch of {batch} {name} jobs: the broker is unavailable "
            f"({type(exc).__name__}: {exc}); the {done} jobs of the batches before it are "
            "queued, this batch may be in part, the rest is not"
        )
    return exc


def _validate(
    task: PlatformTask,
    payloads: list[Mapping[str, Any]],
    keys: Sequence[str | None] | None,
) -> list[_Item]:
    """Every payload validated (InvalidPayload naming the first bad one); nothing published."""
    if keys is not None and len(keys) != len(payloads):
        raise InvalidPayload(
            f"idempotency_keys has {len(keys)} entries for {len(payloads)} payloads: "
            "give one per payload (None for none)"
        )
    items = []
    ids = _new_ids(len(payloads))
    for index, payload in enumerate(payloads):
        key = keys[index] if keys is not None else None
        try:
            if not isinstance(payload, Mapping):
                raise InvalidPayload(
                    f"a payload is a mapping of keyword arguments, got {type(payload).__name__}"
                )
            if key is not None:
                check_key(key)
            _, kwargs = task.validate_payload((), dict(payload))
        except InvalidPayload as exc:
            raise InvalidPayload(f"payloads[{index}]: {exc}; nothing was queued") from exc
        items.append(_Item(index, ids[index], kwargs, key))
    return items


def _new_ids(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs, in the form ``str(uuid4())`` gives, from one read of
    the system's randomness (not one per id: on a loaded machine each read is a costly syscall)
    and without a ``UUID`` object per id (about 3.5 µs each, three ids per job: a tenth of a
    bulk submission's time)."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(byte & 0x0F | 0x40 for byte in raw[6::16])  # version 4
    raw[8::16] = bytes(byte & 0x3F | 0x80 for byte in raw[8::16])  # the RFC 4122 variant
    digits = raw.hex()
    return [f"{digits[at:at + 8]}-{digits[at + 8:at + 12]}-{digits[at + 12:at + 16]}-"
            f"{digits[at + 16:at + 20]}-{digits[at + 20:at + 32]}"
            for at in range(0, 32 * count, 32)]  # fmt: skip


def _random_hex(count: int) -> list[str]:
    """``count`` strings of 32 random hex digits (event ids, as :class:`Transition` makes)."""
    digits = os.urandom(16 * count).hex()
    return [digits[at : at + 32] for at in range(0, 32 * count, 32)]


class _Batch:
    """One batch of validated jobs: published together, then recorded as queued."""

    def __init__(
        self,
        task: PlatformTask,
        items: list[_Item],
        headers: dict[str, Any],
        broker_priority: int | None,
        countdown: float | None,
    ) -> None:
        self.task = task
        self.app = task.app
        self.items = items
        self.headers = headers
        self.priority = broker_priority
        self.countdown = countdown
        self.queue = self.app.amqp.queues[self.app.topology.queue_name(task.family)]
        #: each job's payload without its secrets (for the repr and the history)
        self.redacted: list[dict[str, Any]] = []

    def send(self) -> None:
        at = time.time()
        if self.app.settings.broker_kind is BrokerKind.RABBITMQ:
            self._publish_confirmed()
        else:
            self._publish_pipelined()
        self._record(at)

    def _publish_pipelined(self) -> None:
        """Redis: one LPUSH of the whole batch; the embedded broker: one message after
        another."""
        with self.app.producer_or_acquire() as producer:
            producer.maybe_declare(self.queue)
            channel = producer.channel
            if isinstance(channel, redis_transport.Channel) and not (
                channel._expires and self.queue.name in channel._expires
            ):
                self._push_all(channel)
                return
            with producer.batch(max_size=len(self.items) + 1):
                self._publish_all(producer)

    def _push_all(self, channel: Any) -> None:
        """Every message of the batch in one LPUSH, each in the envelope kombu's Redis channel
        reads (kombu would build one message object, one delivery tag and three JSON texts per
        job; the list takes them in order: the first pushed is the first taken)."""
        name = self.queue.name
        priority = self.priority if self.priority is not None else channel.default_priority
        key = channel._q_for_pri(name, channel._get_message_priority(
            {"properties": {"priority": priority}}, reverse=False
        ))  # fmt: skip
        delivery_info = {"exchange": "", "routing_key": name}
        tags = _new_ids(len(self.items))
        envelopes = []
        for (headers, properties, body), tag in zip(self._messages(), tags, strict=True):
            properties.update(delivery_mode=2, delivery_info=delivery_info, priority=priority,
                              body_encoding="base64", delivery_tag=tag)  # fmt: skip
            envelopes.append(_dumps({
                "body": b64encode(str(kombu_json.dumps(body)).encode()).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": properties,
            }))  # fmt: skip
        with channel.conn_or_acquire() as client:
            client.lpush(key, *envelopes)

    def _publish_confirmed(self) -> None:
        """RabbitMQ: every message on one confirm-mode channel, then one wait for the acks."""
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            channel = connection.channel()
            try:
                confirms = _Confirms(channel)
                producer = Producer(channel, auto_declare=False)
                producer.maybe_declare(self.queue)
                with _coalesced_writes(channel.connection.transport):
                    self._send_frames(channel)
                confirms.wait(len(self.items), timeout=CONFIRM_TIMEOUT)
            finally:
                channel.close()

    def _send_frames(self, channel: Any) -> None:
        """RabbitMQ: each message as kombu's ``Producer.publish`` builds it (the JSON body,
        persistent, the broker priority), handed to py-amqp's frame writer. py-amqp's
        ``basic_publish`` first reads the socket for a ``connection.blocked`` notice, with two
        timeout changes and a system call per message: about half of a bulk submission's time.
        Such a notice is still read, with the confirms, once the batch is written."""
        name = self.queue.name
        for headers, properties, body in self._messages():
            properties["delivery_mode"] = 2  # persistent
            content = kombu_json.dumps(body)
            message = channel.prepare_message(
                content, self.priority, "application/json", "utf-8", headers, properties
            )
            channel.send_method(spec.Basic.Publish, "Bssbb", (0, "", name, False, False), message)

    def _publish_all(self, producer: Any) -> None:
        queue_name = self.queue.name
        for headers, properties, body in self._messages():
            producer.publish(body, exchange="", routing_key=queue_name, serializer="json",
                             headers=headers, priority=self.priority,
                             delivery_mode="persistent", retry=False, **properties)  # fmt: skip

    def _messages(self) -> Iterator[tuple[dict[str, Any], dict[str, Any], Any]]:
        """Each job's Celery message (protocol 2): headers, properties, body."""
        task, amqp = self.task, self.app.amqp
        sensitive = task.sensitive
        parent = self.app.current_worker_task
        root_id = parent_id = None
        if parent is not None:  # a job fanning out: its children name it, as Celery's do
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
        origin = anon_nodename()
        self.redacted = []
        for item in self.items:
            redacted = redact(item.kwargs, sensitive)
            self.redacted.append(redacted)
            headers, properties, body, _ = amqp.as_task_v2(
                item.id, task.name, (), item.kwargs, countdown=self.countdown,
                root_id=root_id, parent_id=parent_id, origin=origin,
                ignore_result=task.ignore_result, argsrepr="()",
                kwargsrepr=saferepr(redacted, REPR_MAX) if redacted else "{}",
            )  # fmt: skip
            headers.update(self.headers)
            yield headers, properties, body

    def _record(self, at: float) -> None:
        app = self.app
        if not app.settings.history_enabled:
            return
        # what every job of the batch shares, once; then each one's redacted payload
        common = recorder.job_facts(app, self.task.name, (), {}, self.headers)
        common["queue"] = self.task.family
        event_ids = _random_hex(len(self.items))
        for item, redacted, event in zip(self.items, self.redacted, event_ids, strict=True):
            facts = {**common, "kwargs": redacted}
            recorder.record(app, Transition(item.id, JobState.QUEUED, 1, at, facts=facts,
                                            event_id=event))  # fmt: skip


def _dumps(value: Any) -> bytes:
    """The envelope as JSON: by orjson, as its values are plain JSON; by kombu's encoder should
    one not be (a date or time, which kombu writes its own way, or what orjson refuses)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_PASSTHROUGH_DATETIME)
    except TypeError:
        return str(kombu_json.dumps(value)).encode()


@contextmanager
def _coalesced_writes(transport: Any) -> Iterator[None]:
    """py-amqp sends each message with a system call of its own: gather a batch's messages and
    send them :data:`WRITE_CHUNK` bytes at a time, so that the broker takes in one chunk while
    the next is encoded (a batch that fails half-way may be queued in part)."""
    write = transport._write
    buffer = bytearray()

    def gather(data: bytes) -> None:
        buffer.extend(data)
        if len(buffer) >= WRITE_CHUNK:
            write(bytes(buffer))
            buffer.clear()

    transport._write = gather
    try:
        yield
    finally:
        transport._write = write
    if buffer:
        write(bytes(buffer))


class _Confirms:
    """Publisher confirms of one py-amqp channel, counted (acks may cover several messages)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.floor = 0  # every delivery tag up to here is confirmed
        self.above: set[int] = set()  # confirmed tags above the floor
        self.nacked = 0
        if not channel._confirm_selected:
            channel._confirm_selected = True
            channel.confirm_select()
        # publish without waiting per message (the connection may confirm every publish)
        channel.basic_publish = channel._basic_publish
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)

    def _ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.floor = max(self.floor, tag)
            self.above = {t for t in self.above if t > self.floor}
        elif tag > self.floor:
            self.above.add(tag)

    def _nack(self, tag: int, multiple: bool) -> None:
        self.nacked += 1
        self._ack(tag, multiple)

    def confirmed(self) -> int:
        return self.floor + len(self.above)

    def wait(self, sent: int, *, timeout: float) -> None:
        """Until the broker confirmed all ``sent`` messages; PublishNotConfirmed otherwise."""
        deadline = time.monotonic() + timeout
        connection = self.channel.connection
        while self.confirmed() < sent:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishNotConfirmed(
                    f"RabbitMQ confirmed {self.confirmed()} of {sent} messages within "
                    f"{timeout:.0f} s; the others may or may not be queued"
                )
            try:
                connection.drain_events(timeout=remaining)
            except TimeoutError:  # socket.timeout: checked against the deadline above
                continue
        if self.nacked:
            raise PublishNotConfirmed(
                f"RabbitMQ refused (nacked) {self.nacked} of {sent} messages: they are not queued"
            )
