"""Topology: exchange and queue names, queue arguments, priorities per broker."""

from __future__ import annotations

import pytest

from tasks_platform.settings import BrokerKind, Settings
from tasks_platform.topology import QUEUES, Priority, Topology

BROKER_URLS = {
    BrokerKind.FILESYSTEM: None,
    BrokerKind.REDIS: "redis://localhost:6379/0",
    BrokerKind.RABBITMQ: "amqp://guest:guest@localhost:5672//",
}
ALL_KINDS = list(BROKER_URLS)


def topology(kind: BrokerKind = BrokerKind.FILESYSTEM, prefix: str = "") -> Topology:
    return Topology(Settings(broker_url=BROKER_URLS[kind], queue_prefix=prefix))


def test_families_are_the_declared_ones() -> None:
    assert QUEUES == ("ai", "email", "reports", "webhooks", "payments", "default")


@pytest.mark.parametrize("prefix", ["", "ci7_"])
@pytest.mark.parametrize("family", QUEUES)
def test_queue_name_carries_the_prefix(prefix: str, family: str) -> None:
    assert topology(prefix=prefix).queue_name(family) == f"{prefix}{family}"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_exchanges_are_durable_direct_and_prefixed(kind: BrokerKind) -> None:
    topo = topology(kind, prefix="ci7_")
    for exchange, name in (
        (topo.work_exchange, "ci7_tasks"),
        (topo.dead_exchange, "ci7_tasks.dead"),
    ):
        assert exchange.name == name
        assert exchange.type == "direct"
        assert exchange.durable


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("prefix", ["", "ci7_"])
def test_work_queues_cover_every_family_on_the_work_exchange(kind: BrokerKind, prefix: str) -> None:
    topo = topology(kind, prefix)
    queues = topo.work_queues()
    assert [queue.name for queue in queues] == [f"{prefix}{family}" for family in QUEUES]
    for queue in queues:
        assert queue.exchange.name == f"{prefix}tasks"
        assert queue.routing_key == queue.name
        assert queue.durable


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("prefix", ["", "ci7_"])
def test_every_family_has_a_dead_queue_bound_to_the_dead_exchange(
    kind: BrokerKind, prefix: str
) -> None:
    topo = topology(kind, prefix)
    dead = topo.dead_queues()
    assert [queue.name for queue in dead] == [f"{prefix}{family}.dead" for family in QUEUES]
    for queue in dead:
        assert queue.exchange.name == f"{prefix}tasks.dead"
        assert queue.routing_key == queue.name
        assert queue.durable
        assert not queue.queue_arguments


@pytest.mark.parametrize("family", QUEUES)
def test_rabbitmq_work_queues_have_priorities_and_dead_letter_arguments(family: str) -> None:
    queue = topology(BrokerKind.RABBITMQ, prefix="ci7_").work_queue(family)
    assert queue.queue_arguments == {
        "x-max-priority": 3,
        "x-dead-letter-exchange": "ci7_tasks.dead",
        "x-dead-letter-routing-key": f"ci7_{family}.dead",
    }


@pytest.mark.parametrize("family", QUEUES)
def test_rabbitmq_dead_letter_routing_key_reaches_the_dead_queue(family: str) -> None:
    topo = topology(BrokerKind.RABBITMQ, prefix="p-")
    arguments = topo.work_queue(family).queue_arguments
    dead = topo.dead_queue(family)
    assert arguments["x-dead-letter-exchange"] == dead.exchange.name
    assert arguments["x-dead-letter-routing-key"] == dead.routing_key


@pytest.mark.parametrize("kind", [BrokerKind.REDIS, BrokerKind.FILESYSTEM])
def test_redis_and_file_queues_carry_no_arguments(kind: BrokerKind) -> None:
    assert all(not queue.queue_arguments for queue in topology(kind).work_queues())


@pytest.mark.parametrize(
    ("priority", "rabbitmq", "redis"),
    [
        (Priority.CRITICAL, 3, 0),
        (Priority.HIGH, 2, 3),
        (Priority.NORMAL, 1, 6),
        (Priority.LOW, 0, 9),
    ],
)
def test_priority_values_per_broker(priority: Priority, rabbitmq: int, redis: int) -> None:
    assert topology(BrokerKind.RABBITMQ).priority_value(priority) == rabbitmq
    assert topology(BrokerKind.REDIS).priority_value(priority) == redis
    assert topology(BrokerKind.FILESYSTEM).priority_value(priority) is None


@pytest.mark.parametrize("kind", [BrokerKind.RABBITMQ, BrokerKind.REDIS])
@pytest.mark.parametrize("priority", list(Priority))
def test_priority_name_inverts_priority_value(kind: BrokerKind, priority: Priority) -> None:
    topo = topology(kind)
    assert topo.priority_name(topo.priority_value(priority)) is priority


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (BrokerKind.RABBITMQ, None),
        (BrokerKind.RABBITMQ, 7),
        (BrokerKind.REDIS, None),
        (BrokerKind.REDIS, 5),
        (BrokerKind.FILESYSTEM, 0),
        (BrokerKind.FILESYSTEM, None),
    ],
)
def test_priority_name_is_normal_when_unknown_or_absent(
    kind: BrokerKind, value: int | None
) -> None:
    assert topology(kind).priority_name(value) is Priority.NORMAL


@pytest.mark.parametrize("method", ["queue_name", "work_queue", "dead_queue", "check_family"])
def test_unknown_family_is_refused_naming_the_declared_queues(method: str) -> None:
    with pytest.raises(ValueError, match="unknown queue 'billing'") as caught:
        getattr(topology(prefix="ci7_"), method)("billing")
    assert "declared queues: ai, email, reports, webhooks, payments, default" in str(caught.value)


@pytest.mark.parametrize("value", ["critical", "high", "normal", "low", Priority.HIGH])
def test_priority_parse_accepts_names_and_members(value: str) -> None:
    assert Priority.parse(value) == value
    assert isinstance(Priority.parse(value), Priority)


@pytest.mark.parametrize("value", ["urgent", "HIGH", "", "3"])
def test_priority_parse_error_lists_the_names(value: str) -> None:
    with pytest.raises(ValueError, match=f"unknown priority {value!r}") as caught:
        Priority.parse(value)
    assert str(caught.value).endswith("expected one of: critical, high, normal, low")


@pytest.mark.parametrize(
    ("prefix", "queue_name", "family"),
    [
        ("", "reports", "reports"),
        ("", "default", "default"),
        ("", "reports.dead", None),
        ("", "celery", None),
        ("ci7_", "ci7_payments", "payments"),
        ("ci7_", "payments", None),
        ("ci7_", "ci8_payments", None),
        ("ci7_", "ci7_payments.dead", None),
        ("ci7_", "ci7_", None),
        ("ci7_", "", None),
    ],
)
def test_family_of_recognises_only_our_work_queues(
    prefix: str, queue_name: str, family: str | None
) -> None:
    assert topology(prefix=prefix).family_of(queue_name) == family


@pytest.mark.parametrize("family", QUEUES)
def test_family_of_inverts_queue_name(family: str) -> None:
    topo = topology(prefix="x-")
    assert topo.family_of(topo.queue_name(family)) == family
