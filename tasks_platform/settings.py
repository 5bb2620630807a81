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

from pydantic import Field, model_validator
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
    max_payload_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest payload accepted at submit (bytes)."
    )
    polling_interval: float = Field(
        default=0.1, gt=0, description="Embedded broker: seconds between polls of the queue."
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.broker_kind  # noqa: B018 - validates the scheme early, with a clear message
        if self.time_limit <= self.soft_time_limit:
            raise ValueError(
                f"TASKS_TIME_LIMIT ({self.time_limit}) must be greater than "
                f"TASKS_SOFT_TIME_LIMIT ({self.soft_time_limit})"
            )
        if self.broker_kind is BrokerKind.REDIS and self.backoff_max >= self.visibility_timeout:
            raise ValueError(
                f"TASKS_BACKOFF_MAX ({self.backoff_max}) must stay below "
                f"TASKS_VISIBILITY_TIMEOUT ({self.visibility_timeout}): on Redis a retry "
                "waiting longer than the visibility timeout is delivered twice"
            )
        return self

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
