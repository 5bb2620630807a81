"""Celery configuration: the only file that knows Celery's setting names.

It turns a :class:`tasks_platform.settings.Settings` into the mapping Celery reads. Nothing
here reads the environment; ``tasks_platform.application.create_app`` calls :func:`celery_config`.
"""

from __future__ import annotations

from typing import Any

from tasks_platform.settings import BrokerKind, Settings
from tasks_platform.topology import REDIS_PRIORITY_STEPS, Priority, Topology


def celery_config(settings: Settings, topology: Topology) -> dict[str, Any]:
    """Celery settings for these platform settings."""
    default_queue = topology.queue_name("default")
    config: dict[str, Any] = {
        "broker_url": settings.effective_broker_url,
        "broker_transport_options": _transport_options(settings),
        "broker_connection_retry_on_startup": True,
        # JSON only, everywhere: pickle is never accepted (CVE-2021-23727 and friends)
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # at-least-once delivery
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # a failed or timed-out job is acknowledged only after it is in its dead-letter queue
        "task_acks_on_failure": True,
        "task_acks_on_timeout": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # routing: a queue nobody declared is an error at publish time
        "task_queues": topology.work_queues(),
        "task_create_missing_queues": False,
        "task_default_queue": default_queue,
        "task_default_exchange": topology.work_exchange.name,
        "task_default_exchange_type": "direct",
        "task_default_routing_key": default_queue,
        "task_default_priority": topology.priority_value(Priority.NORMAL),
        # time limits (each job type may set its own)
        "task_soft_time_limit": settings.soft_time_limit,
        "task_time_limit": settings.time_limit,
        # events, so that Flower sees everything
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "control_exchange": f"{settings.queue_prefix}celery",
        "event_exchange": f"{settings.queue_prefix}celeryev",
        # dead-lettering of undecodable and unknown messages
        "worker_consumer": "tasks_platform.worker:PlatformConsumer",
        "enable_utc": True,
        "timezone": "UTC",
    }
    if settings.result_backend:
        config["result_backend"] = settings.result_backend
        config["result_extended"] = True
        config["result_expires"] = 24 * 3600
        if settings.result_backend.startswith(("redis://", "rediss://")):
            config["result_backend_transport_options"] = {
                "visibility_timeout": settings.visibility_timeout
            }
    else:
        config["task_ignore_result"] = True
    return config


def _transport_options(settings: Settings) -> dict[str, Any]:
    kind = settings.broker_kind
    if kind is BrokerKind.FILESYSTEM:
        folders = settings.broker_folders()
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            # consumers claim a message by renaming it in here: same filesystem as queue/
            "processed_folder": str(folders["processed"]),
            "polling_interval": settings.polling_interval,
        }
    if kind is BrokerKind.REDIS:
        return {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.redis_restore_interval,
            "unacked_restore_throttle": 1,
            "priority_steps": list(REDIS_PRIORITY_STEPS),
            "queue_order_strategy": "priority",
        }
    return {"confirm_publish": True}
