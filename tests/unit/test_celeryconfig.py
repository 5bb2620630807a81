"""celeryconfig.celery_config: the Celery settings derived from the platform settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kombu.utils.imports import symbol_by_name

from celeryconfig import celery_config
from tasks_platform.application import create_app
from tasks_platform.settings import Settings
from tasks_platform.topology import Topology

REDIS = "redis://localhost:6379/0"
AMQP = "amqp://guest:guest@localhost:5672//"
BROKERS = [None, REDIS, AMQP]


def config_for(settings: Settings) -> dict[str, Any]:
    return celery_config(settings, Topology(settings))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.mark.parametrize("broker_url", BROKERS)
def test_only_json_is_ever_serialised_or_accepted(broker_url: str | None, data_dir: Path) -> None:
    config = config_for(Settings(broker_url=broker_url, data_dir=data_dir))
    assert config["accept_content"] == ["json"]
    assert config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == "json"
    assert config["result_serializer"] == "json"
    assert config["event_serializer"] == "json"


@pytest.mark.parametrize("broker_url", BROKERS)
def test_delivery_is_at_least_once(broker_url: str | None, data_dir: Path) -> None:
    config = config_for(Settings(broker_url=broker_url, data_dir=data_dir))
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["task_acks_on_failure"] is True
    assert config["task_acks_on_timeout"] is True
    assert config["worker_cancel_long_running_tasks_on_connection_loss"] is True


@pytest.mark.parametrize(("multiplier", "expected"), [(None, 1), (4, 4)])
def test_prefetch_is_one_job_per_process_by_default(
    multiplier: int | None, expected: int, data_dir: Path
) -> None:
    options = {} if multiplier is None else {"prefetch_multiplier": multiplier}
    config = config_for(Settings(data_dir=data_dir, **options))
    assert config["worker_prefetch_multiplier"] == expected


def test_routing_uses_only_declared_queues(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, queue_prefix="ci7_")
    config = config_for(settings)
    assert config["task_create_missing_queues"] is False
    assert [queue.name for queue in config["task_queues"]] == [
        queue.name for queue in Topology(settings).work_queues()
    ]
    assert config["task_default_queue"] == "ci7_default"
    assert config["task_default_routing_key"] == "ci7_default"
    assert config["task_default_exchange"] == "ci7_tasks"
    assert config["task_default_exchange_type"] == "direct"
    assert config["control_exchange"] == "ci7_celery"
    assert config["event_exchange"] == "ci7_celeryev"


@pytest.mark.parametrize(("broker_url", "priority"), [(None, None), (REDIS, 6), (AMQP, 1)])
def test_default_priority_is_normal_for_the_broker(
    broker_url: str | None, priority: int | None, data_dir: Path
) -> None:
    config = config_for(Settings(broker_url=broker_url, data_dir=data_dir))
    assert config["task_default_priority"] == priority


def test_events_are_on_for_flower(data_dir: Path) -> None:
    config = config_for(Settings(data_dir=data_dir))
    assert config["worker_send_task_events"] is True
    assert config["task_send_sent_event"] is False  # a second message per delay(): opt-in
    assert config["task_track_started"] is True
    assert config_for(Settings(data_dir=data_dir, sent_events=True))["task_send_sent_event"]


def test_worker_consumer_is_the_platform_consumer(data_dir: Path) -> None:
    config = config_for(Settings(data_dir=data_dir))
    assert config["worker_consumer"] == "tasks_platform.worker:PlatformConsumer"
    consumer = symbol_by_name(config["worker_consumer"])
    assert consumer.__name__ == "PlatformConsumer"


def test_time_limits_come_from_the_settings(data_dir: Path) -> None:
    config = config_for(Settings(data_dir=data_dir, soft_time_limit=12.0, time_limit=15.0))
    assert (config["task_soft_time_limit"], config["task_time_limit"]) == (12.0, 15.0)


def test_utc_everywhere(data_dir: Path) -> None:
    config = config_for(Settings(data_dir=data_dir))
    assert config["enable_utc"] is True
    assert config["timezone"] == "UTC"


def test_filesystem_transport_uses_the_broker_folders_under_data_dir(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, polling_interval=0.05)
    config = config_for(settings)
    root = data_dir.resolve() / "broker"
    assert config["broker_url"] == "embedded://localhost//"
    expected = {
        "data_folder_in": str(root / "queue"),
        "data_folder_out": str(root / "queue"),
        "control_folder": str(root / "control"),
        "processed_folder": str(root / "processed"),
        "polling_interval": 0.05,
    }
    assert expected.items() <= config["broker_transport_options"].items()


def test_redis_transport_options_have_visibility_timeout_and_priority_steps(
    data_dir: Path,
) -> None:
    config = config_for(Settings(broker_url=REDIS, data_dir=data_dir, visibility_timeout=900.0))
    assert config["broker_url"] == REDIS
    options = config["broker_transport_options"]
    assert options["visibility_timeout"] == 900.0
    assert options["priority_steps"] == [0, 3, 6, 9]
    assert options["queue_order_strategy"] == "priority"


@pytest.mark.parametrize(("visibility", "expire"), [(6.0, 6), (900.0, 300), (3600.0, 300)])
def test_redis_restore_lock_expires_within_one_visibility_timeout(
    visibility: float, expire: int, data_dir: Path
) -> None:
    # a worker cut off while it holds the lock must not stop the others' sweeps for long
    settings = Settings(broker_url=REDIS, data_dir=data_dir, visibility_timeout=visibility,
                        backoff_max=4)  # fmt: skip
    assert config_for(settings)["broker_transport_options"]["unacked_mutex_expire"] == expire


@pytest.mark.parametrize("heartbeat", [0.0, 2.0, 60.0])
def test_broker_heartbeat_comes_from_the_settings(heartbeat: float, data_dir: Path) -> None:
    settings = Settings(broker_url=AMQP, data_dir=data_dir, broker_heartbeat=heartbeat)
    assert config_for(settings)["broker_heartbeat"] == heartbeat


def test_amqp_transport_confirms_publishes(data_dir: Path) -> None:
    config = config_for(Settings(broker_url=AMQP, data_dir=data_dir))
    assert config["broker_url"] == AMQP
    assert config["broker_transport_options"]["confirm_publish"] is True


@pytest.mark.parametrize("broker_url", BROKERS)
def test_without_result_backend_results_are_ignored(broker_url: str | None, data_dir: Path) -> None:
    config = config_for(Settings(broker_url=broker_url, data_dir=data_dir))
    assert config["task_ignore_result"] is True
    assert "result_backend" not in config


def test_redis_result_backend_keeps_extended_results_with_visibility_timeout(
    data_dir: Path,
) -> None:
    backend = "redis://localhost:6379/1"
    config = config_for(Settings(data_dir=data_dir, result_backend=backend))
    assert config["result_backend"] == backend
    assert config["result_extended"] is True
    assert config["result_expires"] == 24 * 3600
    assert config["result_backend_transport_options"] == {"visibility_timeout": 3600.0}
    assert "task_ignore_result" not in config


def test_database_result_backend_has_no_redis_options(data_dir: Path) -> None:
    backend = "db+postgresql://tasks@db/tasks"
    config = config_for(Settings(data_dir=data_dir, result_backend=backend))
    assert config["result_backend"] == backend
    assert "result_backend_transport_options" not in config


@pytest.mark.parametrize("broker_url", BROKERS)
def test_create_app_applies_the_configuration(broker_url: str | None, data_dir: Path) -> None:
    settings = Settings(broker_url=broker_url, data_dir=data_dir, queue_prefix="ci7_")
    app = create_app(settings, set_as_current=False)
    assert app.settings is settings
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late is True
    assert app.conf.task_default_queue == "ci7_default"
    assert app.conf.worker_consumer == "tasks_platform.worker:PlatformConsumer"
    assert app.topology.queue_name("ai") == "ci7_ai"


def test_job_events_can_be_turned_off(data_dir: Path) -> None:
    config = config_for(Settings(data_dir=data_dir, task_events=False))
    assert config["worker_send_task_events"] is False


def test_redis_connections_time_out_so_a_silent_broker_never_hangs_a_publish(
    data_dir: Path,
) -> None:
    settings = Settings(broker_url=REDIS, data_dir=data_dir, broker_socket_timeout=2.5)
    options = config_for(settings)["broker_transport_options"]
    assert options["socket_timeout"] == 2.5
    assert options["socket_connect_timeout"] == 2.5


@pytest.mark.parametrize(
    ("broker_url", "transport"),
    [
        (REDIS, "tasks_platform.redis_transport:Transport"),
        ("rediss://localhost:6380/0", None),  # kombu's own: its TLS checks read the scheme
        (AMQP, None),
        (None, None),
    ],
)
def test_redis_brokers_use_the_platform_redis_transport(
    broker_url: str | None, transport: str | None, data_dir: Path
) -> None:
    config = config_for(Settings(broker_url=broker_url, data_dir=data_dir))
    assert config.get("broker_transport") == transport
