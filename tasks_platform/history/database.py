"""Engines and sessions for the history database (PostgreSQL or SQLite)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.history.encoding import loads
from tasks_platform.settings import Settings


def create_history_engine(settings: Settings, **options: Any) -> Engine:
    """An engine for ``settings.effective_database_url``; nothing connects until it is used."""
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # JSON columns read back by orjson (the writer reads every row it merges)
    options.setdefault("json_deserializer", loads)
    options.setdefault("pool_pre_ping", True)
    options.setdefault("pool_size", 2)
    options.setdefault("max_overflow", 2)
    return create_engine(url, **options)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writers
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
