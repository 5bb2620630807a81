"""Alembic environment of the history database.

The database is the platform's own: ``load_settings().effective_database_url``, that is
``TASKS_DATABASE_URL`` or, when unset, the SQLite file under ``TASKS_DATA_DIR``. alembic.ini holds
no URL. Code that migrates programmatically (:mod:`tasks_platform.history.migrations`) passes an
open connection in ``config.attributes["connection"]`` instead, and that connection is used as is.

The version table is created unqualified, so it lands in the same schema as the tables: the
first schema of the connection's ``search_path`` on PostgreSQL.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection

from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import Base
from tasks_platform.settings import load_settings

config = context.config
target_metadata = Base.metadata

_given: Connection | None = config.attributes.get("connection")

# The command line configures logging from alembic.ini; programmatic callers keep their own.
if _given is None and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "compare_type": True,
        # SQLite cannot ALTER most things: rebuild the table ("batch" mode) instead
        "render_as_batch": dialect_name == "sqlite",
    }


def run_migrations_offline() -> None:
    """Emit the SQL to stdout (``alembic upgrade head --sql``) without connecting."""
    url = load_settings().effective_database_url
    dialect_name = url.split(":", 1)[0].split("+", 1)[0]
    context.configure(
        url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **_options(dialect_name)
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    if _given is not None:
        _run(_given)
        return
    engine = create_history_engine(load_settings())  # applies the SQLite pragmas
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
