"""Bring the history database to the schema of this release, from code.

The Alembic scripts live in the repository, next to the package (``alembic.ini`` and
``alembic/``); the command line equivalent of :func:`upgrade` is ``alembic upgrade head``, run
from the repository. Every function connects through :func:`create_history_engine`, so the
SQLite pragmas apply, and disposes of its engine before returning.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import alembic.command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from tasks_platform.errors import ConfigurationError
from tasks_platform.history.database import create_history_engine
from tasks_platform.settings import Settings

#: the repository the package is installed (editable) from: .../tasks_platform/history/<this>
_ROOT = Path(__file__).resolve().parents[2]


#: Alembic's ``op`` and ``context`` are process-wide: one command at a time per process (a
#: recorder's thread may bring the embedded history up to date while another thread migrates)
MIGRATING = threading.RLock()


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Apply every migration up to ``revision`` (default: the newest)."""
    config = alembic_config()
    with MIGRATING, _connection(settings) as connection:
        config.attributes["connection"] = connection
        alembic.command.upgrade(config, revision)


def downgrade(settings: Settings, revision: str) -> None:
    """Revert migrations down to ``revision`` (``"base"`` = an empty database)."""
    config = alembic_config()
    with MIGRATING, _connection(settings) as connection:
        config.attributes["connection"] = connection
        alembic.command.downgrade(config, revision)


def current(settings: Settings) -> str | None:
    """The revision the database is at; None when it was never migrated."""
    with _connection(settings) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_current(settings: Settings) -> bool:
    """True when the database is at the newest revision (the head)."""
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    with _connection(settings) as connection:
        return set(MigrationContext.configure(connection).get_current_heads()) == heads


def alembic_config() -> Config:
    """The Alembic configuration of the repository, usable from any working directory."""
    ini, scripts = _ROOT / "alembic.ini", _ROOT / "alembic"
    if not ini.is_file() or not (scripts / "env.py").is_file():
        raise ConfigurationError(
            f"the history migrations are not where they should be: expected {ini} and "
            f"{scripts / 'env.py'} next to the tasks_platform package; install the package "
            "from its repository with `pip install -e .`"
        )
    config = Config(str(ini))
    # absolute, so that the working directory does not matter ('%' is configparser syntax)
    config.set_main_option("script_location", str(scripts).replace("%", "%%"))
    return config


@contextmanager
def _connection(settings: Settings) -> Iterator[Connection]:
    """One connection in one transaction: a migration applies in full or not at all."""
    engine = create_history_engine(settings)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()
