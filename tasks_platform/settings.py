"""Typed settings, read from ``TASKS_*`` environment variables.

This is the only module that reads the environment. With nothing configured the platform
runs on the *embedded default*: a broker made of files (kombu's filesystem transport) and a
SQLite history database, both under ``TASKS_DATA_DIR``, so that a fresh machine needs no
server. ``TASKS_BROKER_URL`` selects Redis (``redis://``) or RabbitMQ (``amqp://``) and
``TASKS_DATABASE_URL`` selects PostgreSQL (``postgresql+psycopg://``).
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks_platform.errors import ConfigurationError


class BrokerKind(StrEnum):
    """The three brokers the platform knows how to drive."""

    FILESYSTEM = "filesystem"
    REDIS = "redis"
    RABBITMQ = "rabbitmq"


_SCHEMES = {
    "embedded": BrokerKind.FILESYSTEM,
    "filesystem": BrokerKind.FILESYSTEM,
    "redis": BrokerKind.REDIS,
    "rediss": BrokerKind.REDIS,
    "amqp": BrokerKind.RABBITMQ,
    "amqps": BrokerKind.RABBITMQ,
    "pyamqp": BrokerKind.RABBITMQ,
}


class SmtpSecurity(StrEnum):
    """How the SMTP connection is protected."""

    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class TenantLimit(BaseModel):
    """Limits of one tenant for one job type, enforced across every worker (in Redis).

    ``rate`` jobs may start per ``per`` seconds; at most ``concurrency`` run at once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: int | None = Field(default=None, ge=1)
    per: float = Field(default=1.0, gt=0, le=86400)
    concurrency: int | None = Field(default=None, ge=1)


class ScheduleEntry(BaseModel):
    """A user-defined periodic job: ``job`` with ``payload``, on a ``cron`` line or ``every`` s."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    job: str = Field(min_length=1)
    payload: dict[str, Any] = Field(default_factory=dict)
    cron: str | None = None
    every: float | None = Field(default=None, gt=0)
    priority: str | None = None
    tenant: str | None = None

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleEntry:
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r} needs exactly one of 'cron' and 'every'")
        return self


class Settings(BaseSettings):
    """Everything the platform can be told, with the defaults that make it work locally."""

    model_config = SettingsConfigDict(env_prefix="TASKS_", frozen=True, extra="forbid")

    broker_url: str | None = Field(
        default=None, description="Broker URL; unset = embedded file broker under data_dir."
    )
    database_url: str | None = Field(
        default=None, description="History database URL; unset = SQLite under data_dir."
    )
    result_backend: str | None = Field(
        default=None, description="Celery result backend URL; unset = results not kept."
    )
    data_dir: Path = Field(
        default_factory=lambda: Path.home() / ".local" / "share" / "tasks-platform",
        description="Where the embedded default keeps its files.",
    )
    queue_prefix: str = Field(
        default="", pattern=r"^[A-Za-z0-9_\-]*$", description="Prefix for every queue/exchange."
    )
    max_retries: int = Field(default=5, ge=0, description="Default retries of a job type.")
    backoff_base: float = Field(default=2.0, gt=0, description="First retry delay (s).")
    backoff_max: float = Field(default=600.0, gt=0, description="Longest retry delay (s).")
    soft_time_limit: float = Field(default=300.0, gt=0, description="Default soft limit (s).")
    time_limit: float = Field(default=330.0, gt=0, description="Default hard limit (s).")
    max_deliveries: int = Field(
        default=3, ge=1, description="Worker crashes a job may cause before it is dead-lettered."
    )
    visibility_timeout: float = Field(
        default=3600.0, gt=0, description="Redis: seconds before an unacked job is redelivered."
    )
    redis_restore_interval: int = Field(
        default=60, ge=1, description="Redis: seconds between sweeps for expired unacked jobs."
    )
    prefetch_multiplier: int = Field(default=1, ge=1, description="Jobs reserved per process.")
    task_events: bool = Field(
        default=True,
        description="Worker: send per-job monitoring events (Flower turns them on when it runs).",
    )
    event_flush_interval: float = Field(
        default=0.05,
        ge=0,
        le=5,
        description="Worker (Redis, RabbitMQ): at most one publish of buffered job events per "
        "this many seconds (the events of many jobs in one message); 0 = each as soon as possible.",
    )
    sent_events: bool = Field(
        default=False,
        description="Producer: send a task-sent event per job (a second message per delay(); "
        "monitors then see jobs before a worker receives them).",
    )
    broker_socket_timeout: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Redis: seconds to wait for a connection or a reply; a silent broker fails "
        "a publish in about four times this (redis retries) rather than hanging.",
    )
    max_payload_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest payload accepted at submit (bytes)."
    )
    max_message_bytes: int = Field(
        default=4 * 1_048_576,
        ge=1024,
        description="Worker: largest job message body taken (bytes); larger = dead-lettered.",
    )
    history_enabled: bool = Field(default=True, description="Record every job in the history.")
    history_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="History events written per batch."
    )
    history_flush_interval: float = Field(
        default=1.0, gt=0, le=60, description="Seconds between history writes."
    )
    history_buffer_max: int = Field(
        default=100_000, ge=100, description="History events kept in memory during an outage."
    )
    history_journal_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Disk kept for them beyond that."
    )
    history_write_ahead: bool = Field(
        default=True,
        description="Workers append each history event to a local file, which the worker's "
        "history writer process writes: a killed worker loses none.",
    )
    history_result_max_bytes: int = Field(
        default=8192, ge=256, description="Largest job result stored in full (bytes)."
    )
    polling_interval: float = Field(
        default=0.1, gt=0, description="Embedded broker: seconds between polls of the queue."
    )
    cancel_retention: float = Field(
        default=7 * 86400.0,
        ge=60,
        description="Seconds a cancellation is honoured: a job still queued later may run.",
    )
    control_recheck_interval: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds between a worker's re-reads of queue pauses and cancellations.",
    )
    broker_heartbeat: float = Field(
        default=60.0,
        ge=0,
        description="RabbitMQ: heartbeat (s) that detects a dead connection; 0 = off.",
    )
    worker_liveness_file: Path | None = Field(
        default=None,
        description="Worker: file touched while it consumes, for probes; unset = none.",
    )
    worker_liveness_interval: float = Field(
        default=10.0, gt=0, le=3600, description="Worker: seconds between touches of that file."
    )
    flower_user: str | None = Field(
        default=None, description="Flower: basic-auth user name (with flower_password)."
    )
    flower_password: SecretStr | None = Field(
        default=None, description="Flower: basic-auth password (8+ characters, no comma)."
    )
    flower_broker_api: SecretStr | None = Field(
        default=None,
        description="Flower: RabbitMQ management API URL, for queue lengths (http://u:p@host:15672/api/).",
    )
    health_max_unsuccessful_jobs: int = Field(
        default=10, ge=0, description="Health: failed or dead jobs per job type in the window."
    )
    health_max_queue_depth: int = Field(
        default=50, ge=0, description="Health: messages waiting per work queue."
    )
    health_max_dead_letters: int = Field(
        default=0, ge=0, description="Health: messages per dead-letter queue."
    )
    health_max_wait_p95: float = Field(
        default=60.0, gt=0, description="Health: p95 wait per job type in the window (s)."
    )
    actor: str | None = Field(
        default=None, description="Who command-line actions are audited as (else the OS user)."
    )
    api_max_body_bytes: int = Field(
        default=2 * 1_048_576,
        ge=1024,
        description="Admin API: largest request body accepted (bytes); larger ones get 413.",
    )

    history_retention_days: float = Field(
        default=30.0, gt=0, description="Days of history the scheduled cleanup keeps."
    )
    cleanup_interval: float = Field(
        default=3600.0, gt=0, description="Beat: seconds between history cleanups."
    )
    stats_snapshot_interval: float = Field(
        default=60.0, gt=0, description="Beat: seconds between stats snapshots."
    )
    schedules: list[ScheduleEntry] = Field(
        default_factory=list, description="Beat: user-defined periodic jobs (JSON list)."
    )
    ai_base_url: str = Field(
        default="https://api.openai.com/v1",
        description="ai.generate: OpenAI-compatible API base URL (OpenAI, Ollama, vLLM ...).",
    )
    ai_model: str | None = Field(default=None, description="ai.generate: default model.")
    ai_api_key: SecretStr | None = Field(default=None, description="ai.generate: API key.")
    ai_timeout: float = Field(default=120.0, gt=0, description="ai.generate: request timeout.")
    smtp_host: str = Field(default="localhost", description="email.send: SMTP server host.")
    smtp_port: int = Field(default=587, ge=1, le=65535, description="email.send: SMTP port.")
    smtp_security: SmtpSecurity = Field(
        default=SmtpSecurity.STARTTLS, description="email.send: none, starttls or tls."
    )
    smtp_user: str | None = Field(default=None, description="email.send: SMTP user.")
    smtp_password: SecretStr | None = Field(default=None, description="email.send: password.")
    smtp_sender: str | None = Field(default=None, description="email.send: default From.")
    smtp_timeout: float = Field(default=30.0, gt=0, description="email.send: SMTP timeout.")
    webhook_secret: SecretStr | None = Field(
        default=None, description="webhooks.deliver: default HMAC-SHA256 signing secret."
    )
    webhook_timeout: float = Field(default=10.0, gt=0, description="webhooks.deliver: timeout.")
    payments_base_url: str | None = Field(
        default=None, description="payments.charge: payment provider API base URL."
    )
    payments_api_key: SecretStr | None = Field(
        default=None, description="payments.charge: provider API key."
    )
    payments_timeout: float = Field(default=30.0, gt=0, description="payments.charge: timeout.")
    outbox_relay: bool = Field(
        default=True,
        description="Worker: also run the outbox relay (publishes jobs accepted in the outbox).",
    )
    outbox_poll_interval: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Outbox relay: seconds between polls (PostgreSQL also wakes it by NOTIFY).",
    )
    outbox_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="Outbox relay: jobs published per transaction."
    )
    outbox_retention: float = Field(
        default=7 * 86400.0,
        ge=60,
        description="Outbox relay: seconds a published row is kept (to recognise duplicates).",
    )
    limits_url: str | None = Field(
        default=None, description="Redis for tenant limits; unset = the broker if it is Redis."
    )
    tenant_limits: dict[str, dict[str, TenantLimit]] = Field(
        default_factory=dict,
        description="Per tenant and job type limits (JSON; '*' matches any).",
    )
    limits_defer_delay: float = Field(
        default=1.0, gt=0, le=3600, description="Seconds a job over a concurrency limit waits."
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.broker_kind  # noqa: B018 - validates the scheme early, with a clear message
        if self.time_limit <= self.soft_time_limit:
            raise ValueError(
                f"TASKS_TIME_LIMIT ({self.time_limit}) must be greater than "
                f"TASKS_SOFT_TIME_LIMIT ({self.soft_time_limit})"
            )
        if self.max_message_bytes < self.max_payload_bytes:
            raise ValueError(
                f"TASKS_MAX_MESSAGE_BYTES ({self.max_message_bytes}) must be at least "
                f"TASKS_MAX_PAYLOAD_BYTES ({self.max_payload_bytes}): a message carries a payload"
            )
        if self.broker_kind is BrokerKind.REDIS and self.backoff_max >= self.visibility_timeout:
            raise ValueError(
                f"TASKS_BACKOFF_MAX ({self.backoff_max}) must stay below "
                f"TASKS_VISIBILITY_TIMEOUT ({self.visibility_timeout}): on Redis a retry "
                "waiting longer than the visibility timeout is delivered twice"
            )
        if self.tenant_limits and self.effective_limits_url is None:
            raise ValueError(
                "TASKS_TENANT_LIMITS needs Redis: set TASKS_LIMITS_URL=redis://... "
                "(or use a Redis broker)"
            )
        return self

    @property
    def effective_limits_url(self) -> str | None:
        """The Redis that keeps tenant limits, or None when there is none."""
        if self.limits_url:
            return self.limits_url
        if self.broker_url and self.broker_kind is BrokerKind.REDIS:
            return self.broker_url
        return None

    def tenant_limit(self, tenant: str | None, job: str) -> TenantLimit | None:
        """The limit of ``tenant`` on job type ``job``: the most specific entry, or None."""
        for who in (tenant, "*"):
            entries = self.tenant_limits.get(who) if who is not None else None
            if entries:
                for what in (job, "*"):
                    if what in entries:
                        return entries[what]
        return None

    @property
    def broker_kind(self) -> BrokerKind:
        if self.broker_url is None:
            return BrokerKind.FILESYSTEM
        scheme = self.broker_url.split("://", 1)[0].split("+", 1)[0].lower()
        try:
            return _SCHEMES[scheme]
        except KeyError:
            known = ", ".join(sorted(_SCHEMES))
            raise ValueError(
                f"TASKS_BROKER_URL has scheme {scheme!r}; expected one of: {known}"
            ) from None

    @property
    def embedded(self) -> bool:
        """True when the broker is the local file broker (no server)."""
        return self.broker_kind is BrokerKind.FILESYSTEM

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "embedded://localhost//"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'history.db').resolve()}"

    def broker_folders(self) -> dict[str, Path]:
        """Folders of the embedded file broker (queue, control, processed)."""
        root = self.data_dir.resolve() / "broker"
        return {name: root / name for name in ("queue", "control", "processed")}

    @property
    def max_countdown(self) -> float:
        """Longest delay a retry may wait in the broker without being delivered twice."""
        if self.broker_kind is BrokerKind.REDIS:
            return self.visibility_timeout * 0.9
        return float("inf")


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, turning validation errors into one clear error.

    A ``TASKS_*`` variable the platform does not know is an error too: a typo such as
    ``TASKS_BROKER_ULR`` would otherwise silently fall back to a default.
    """
    known = {f"TASKS_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(name for name in os.environ if name.startswith("TASKS_") and name not in known)
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return Settings(**overrides)
    except ValueError as exc:
        raise ConfigurationError(f"invalid tasks-platform settings: {exc}") from exc
