"""Flower, Celery's live web UI, started on the platform's broker with authentication on.

``tasks-platform flower`` turns the settings into the command line and environment of
``celery -A tasks_platform flower`` and replaces itself with that process. Basic-auth
credentials come from ``TASKS_FLOWER_USER`` / ``TASKS_FLOWER_PASSWORD``; without them Flower is
not started, unless the caller says it is a local development run (``insecure_dev``), which
then listens on a loopback address only.

Secrets never appear on the command line (which every user of the machine can read): the
credentials and the RabbitMQ management URL reach Flower through its ``FLOWER_*`` environment
variables, which only the owner of the process can read.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import urlsplit

from tasks_platform.errors import ConfigurationError
from tasks_platform.settings import BrokerKind, Settings

DEFAULT_PORT = 5555
DEFAULT_ADDRESS = "127.0.0.1"
MIN_PASSWORD_LENGTH = 8
_USER = re.compile(r"^[^:,\s]+$")
_URL_PREFIX = re.compile(r"^[A-Za-z0-9_\-./]*$")


class FlowerError(ConfigurationError):
    """Flower cannot be started safely with these settings and options."""


@dataclass(frozen=True)
class FlowerCommand:
    """How to run Flower: the command line, the variables to add, what the operator should know."""

    argv: list[str]
    #: ``FLOWER_*`` variables to set in Flower's environment (they carry the secrets)
    env: dict[str, str] = field(repr=False)
    #: ``FLOWER_*`` variables to remove from the inherited environment
    unset: frozenset[str]
    url: str
    authenticated: bool
    notes: list[str]


def basic_auth(settings: Settings) -> str | None:
    """``user:password`` from the settings, ``None`` when neither is set; FlowerError otherwise."""
    user = settings.flower_user
    password = settings.flower_password.get_secret_value() if settings.flower_password else None
    if user is None and password is None:
        return None
    if user is None or password is None:
        missing = "TASKS_FLOWER_USER" if user is None else "TASKS_FLOWER_PASSWORD"
        raise FlowerError(f"Flower basic auth needs both TASKS_FLOWER_USER and "
                          f"TASKS_FLOWER_PASSWORD; {missing} is not set")  # fmt: skip
    if not _USER.match(user):
        raise FlowerError(
            f"TASKS_FLOWER_USER {user!r} must not be empty or hold a colon, comma or space"
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        raise FlowerError(
            f"TASKS_FLOWER_PASSWORD is too short: use at least {MIN_PASSWORD_LENGTH} characters"
        )
    if "," in password:  # Flower splits its list of credentials on commas
        raise FlowerError("TASKS_FLOWER_PASSWORD must not contain a comma (Flower splits on it)")
    return f"{user}:{password}"


def flower_command(
    settings: Settings,
    *,
    port: int = DEFAULT_PORT,
    address: str = DEFAULT_ADDRESS,
    url_prefix: str = "",
    insecure_dev: bool = False,
) -> FlowerCommand:
    """The Flower process for these settings; FlowerError when it would not be safe to start."""
    credentials = basic_auth(settings)
    if credentials is None and not insecure_dev:
        raise FlowerError(
            "Flower needs credentials: set TASKS_FLOWER_USER and TASKS_FLOWER_PASSWORD "
            "(basic auth), or pass --insecure-dev for a local development run without them"
        )
    if credentials is None and not _is_loopback(address):
        raise FlowerError(
            f"--insecure-dev serves Flower without authentication, so only on a loopback "
            f"address (127.0.0.1, ::1, localhost), not on {address or 'every interface'!r}"
        )
    prefix = url_prefix.strip("/")
    if not _URL_PREFIX.match(prefix):
        raise FlowerError(f"--url-prefix {url_prefix!r} may only hold letters, digits, - _ . /")
    argv = [
        sys.executable, "-m", "celery", "-A", "tasks_platform", "flower",
        f"--port={port}", f"--address={address}",
        f"--conf={os.devnull}",  # a stray flowerconfig.py must not change the authentication
    ]  # fmt: skip
    if prefix:
        argv.append(f"--url_prefix={prefix}")
    env = {"FLOWER_BASIC_AUTH": credentials} if credentials else {}
    if settings.flower_broker_api is not None:
        env["FLOWER_BROKER_API"] = _broker_api(settings)
    host = f"[{address}]" if ":" in address else address or "127.0.0.1"
    return FlowerCommand(
        argv=argv,
        env=env,
        unset=frozenset({"FLOWER_BASIC_AUTH", "FLOWER_BROKER_API"} - env.keys()),
        url=f"http://{host}:{port}/{prefix + '/' if prefix else ''}",
        authenticated=credentials is not None,
        notes=_notes(settings, authenticated=credentials is not None),
    )


def run_flower(command: FlowerCommand) -> NoReturn:
    """Replace this process with Flower (its signals and exit code are Flower's own)."""
    env = {k: v for k, v in os.environ.items() if k not in command.unset} | command.env
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command.argv[0], command.argv, env)  # noqa: S606 - our own command line


def _broker_api(settings: Settings) -> str:
    assert settings.flower_broker_api is not None
    url = settings.flower_broker_api.get_secret_value()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FlowerError(
            "TASKS_FLOWER_BROKER_API must be the RabbitMQ management API URL, "
            "e.g. http://user:password@rabbit:15672/api/"
        )
    return url


def _notes(settings: Settings, *, authenticated: bool) -> list[str]:
    notes = []
    if not authenticated:
        notes.append(
            "insecure dev run: Flower's pages need no password; its HTTP API stays closed "
            "(Flower opens it without authentication only with FLOWER_UNAUTHENTICATED_API=true)"
        )
    kind = settings.broker_kind
    if kind is BrokerKind.FILESYSTEM:
        notes.append(
            "embedded broker: Flower sees only the workers and jobs of this machine, shows no "
            "queue lengths (Broker page), and the event queue it leaves in the data folder keeps "
            "filling after it stops; use Redis or RabbitMQ for a real deployment"
        )
    elif kind is BrokerKind.RABBITMQ and settings.flower_broker_api is None:
        notes.append(
            "RabbitMQ: queue lengths come from the management API on port 15672 of the broker "
            "host; set TASKS_FLOWER_BROKER_API if it lives elsewhere"
        )
    elif kind is not BrokerKind.RABBITMQ and settings.flower_broker_api is not None:
        notes.append("TASKS_FLOWER_BROKER_API is ignored: it is for RabbitMQ only")
    return notes


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
