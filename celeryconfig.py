"""Celery configuration: the only file that knows Celery's setting names.

It turns a :class:`tasks_platform.settings.Settings` into the mapping Celery reads. Nothing
here reads the environment; ``tasks_platform.application.create_app`` calls :func:`celery_config`.
"""

from __future__ import annotations

from typing import Any

from tasks_platform.redis_transport import TRANSPORT as REDIS_TRANSPORT
from tasks_platform.schedules import beat_jobs, state_file
from tasks_platform.settings import BrokerKind, Settings
from tasks_platform.topology import REDIS_PRIORITY_STEPS, Priority, Topology

#: how long ``delay()``/``apply_async`` keep trying to publish before BrokerUnavailable
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2,
                        "interval_max": 0.2}  # fmt: skip


def celery_config(settings: Settings, topology: Topology) -> dict[str, Any]:
    """Celery settings for these platform settings."""
    default_queue = topology.queue_name("default")
    config: dict[str, Any] = {
        "broker_url": settings.effective_broker_url,
        # redis://: kombu's transport without a new client object per command
        **_broker_transport(settings),
        "broker_transport_options": _transport_options(settings),
        "broker_connection_retry_on_startup": True,
        # a producer rides over a dropped connection or a broker restart for ~0.6 s (3 retries,
        # reconnecting), then gets BrokerUnavailable: nothing queued, resubmit (same key)
        "task_publish_retry": True,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
        # RabbitMQ: a peer that went silent (a cut link) is noticed within about two heartbeats
        "broker_heartbeat": settings.broker_heartbeat,
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
        # (TASKS_TASK_EVENTS=false drops them from the hot path; Flower re-enables them)
        "worker_send_task_events": settings.task_events,
        # off by default as in Celery: it doubles the messages of delay(); the history
        # records queued jobs anyway (TASKS_SENT_EVENTS=true for monitors that want them)
        "task_send_sent_event": settings.sent_events,
        "task_track_started": True,
        "control_exchange": f"{settings.queue_prefix}celery",
        "event_exchange": f"{settings.queue_prefix}celeryev",
        # dead-lettering of undecodable and unknown messages
        "worker_consumer": "tasks_platform.worker:PlatformConsumer",
        "enable_utc": True,
        "timezone": "UTC",
        # beat: the platform's periodic jobs and TASKS_SCHEDULES, checked when beat starts
        "beat_schedule": _beat_schedule(settings),
        "beat_schedule_filename": state_file(settings),
        "beat_scheduler": "tasks_platform.schedules:PlatformScheduler",
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


def _beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat's entries (a bad one is left out with a warning; beat refuses to start on it)."""
    return {
        job.name: {
            "task": job.job,
            "schedule": job.timing,
            "kwargs": job.payload,
            "options": job.publish_options(),
        }
        for job in beat_jobs(settings)
    }


def _broker_transport(settings: Settings) -> dict[str, str]:
    if settings.effective_broker_url.lower().startswith("redis://"):
        return {"broker_transport": REDIS_TRANSPORT}
    return {}


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
            # the sweep's lock: a worker that dies or is cut off while it holds it must not stop
            # every other worker's sweeps for kombu's 300 s, only for one visibility timeout
            "unacked_mutex_expire": min(300, max(1, round(settings.visibility_timeout))),
            "unacked_restore_throttle": 1,
            "priority_steps": list(REDIS_PRIORITY_STEPS),
            "queue_order_strategy": "priority",
            # a broker that accepts the connection and then says nothing (a cut link, a hung
            # server) fails a publish or a relay round in bounded time instead of hanging it
            "socket_timeout": settings.broker_socket_timeout,
            "socket_connect_timeout": settings.broker_socket_timeout,
        }
    return {"confirm_publish": True}
