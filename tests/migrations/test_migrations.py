"""Every Alembic migration applies to an empty database, matches the models, and reverts.

Runs on SQLite (a file under tmp_path) and on a real PostgreSQL, where each test gets a schema
of its own (``search_path``) that is dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import POSTGRES_URL, require_service
from sqlalchemy.pool import NullPool

from tasks_platform.errors import ConfigurationError
from tasks_platform.history import migrations
from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import Base
from tasks_platform.settings import Settings

REPO = Path(__file__).resolve().parents[2]
HISTORY_TABLES = {
    "jobs",
    "job_events",
    "job_cancellations",
    "queue_pauses",
    "audit_log",
    "api_tokens",
    "stats_snapshots",
    "outbox",
}
MIGRATED_TABLES = HISTORY_TABLES | {"alembic_version"}
HEAD = "0005"


@contextmanager
def postgres_schema(tmp_path: Path) -> Iterator[Settings]:
    """Settings pointing at a fresh, empty PostgreSQL schema, dropped on the way out."""
    require_service("postgres", POSTGRES_URL)
    schema = f"t_{uuid.uuid4().hex}"
    admin = sa.create_engine(POSTGRES_URL, poolclass=NullPool)
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield Settings(
            data_dir=tmp_path,
            database_url=f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}",
        )
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """An empty history database on each backend in turn."""
    if request.param == "sqlite":
        yield Settings(data_dir=tmp_path)  # the embedded default: tmp_path/history.db
        return
    with postgres_schema(tmp_path) as postgres:
        yield postgres


@pytest.fixture
def postgres_settings(tmp_path: Path) -> Iterator[Settings]:
    with postgres_schema(tmp_path) as postgres:
        yield postgres


def run(settings: Settings, sql: str, **params: Any) -> list[Any]:
    """Execute one statement in its own transaction; its rows, if any."""
    engine = create_history_engine(settings)
    try:
        with engine.begin() as connection:
            result = connection.execute(sa.text(sql), params)
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


def table_names(settings: Settings) -> set[str]:
    engine = create_history_engine(settings)
    try:
        with engine.connect() as connection:
            return set(sa.inspect(connection).get_table_names())
    finally:
        engine.dispose()


def drift(settings: Settings) -> list[Any]:
    """What ``alembic check`` would report: differences between the database and the models."""
    engine = create_history_engine(settings)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_on_empty_database_creates_history_tables(settings: Settings) -> None:
    assert table_names(settings) == set()
    assert migrations.current(settings) is None
    assert not migrations.is_current(settings)

    migrations.upgrade(settings)

    assert table_names(settings) == MIGRATED_TABLES
    assert migrations.current(settings) == HEAD
    assert migrations.is_current(settings)


def test_migrated_schema_has_no_drift_from_models(settings: Settings) -> None:
    migrations.upgrade(settings)

    assert drift(settings) == []


def test_drift_check_notices_a_missing_index(settings: Settings) -> None:
    # proves the check above can fail: an index the models declare is gone
    migrations.upgrade(settings)
    run(settings, "DROP INDEX ix_jobs_root_id")

    [difference] = drift(settings)

    assert difference[0] == "add_index"
    assert difference[1].name == "ix_jobs_root_id"


def test_downgrade_to_base_removes_tables_and_upgrade_works_again(settings: Settings) -> None:
    migrations.upgrade(settings)

    migrations.downgrade(settings, "base")

    assert table_names(settings) & HISTORY_TABLES == set()
    assert migrations.current(settings) is None
    assert not migrations.is_current(settings)

    migrations.upgrade(settings)

    assert table_names(settings) == MIGRATED_TABLES
    assert drift(settings) == []
    assert migrations.is_current(settings)


def test_deleting_a_job_deletes_its_events(settings: Settings) -> None:
    migrations.upgrade(settings)
    jobs, events = Base.metadata.tables["jobs"], Base.metadata.tables["job_events"]
    now = datetime.now(UTC)
    engine = create_history_engine(settings)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.insert(jobs),
                {"id": "j1", "state": "queued", "progress": 0, "attempts": 0, "updated_at": now},
            )
            connection.execute(
                sa.insert(events),
                {"id": "e1", "job_id": "j1", "state": "queued", "attempt": 0, "at": now},
            )
        with engine.begin() as connection:
            connection.execute(sa.delete(jobs).where(jobs.c.id == "j1"))
        with engine.connect() as connection:
            assert connection.scalar(sa.select(sa.func.count()).select_from(events)) == 0
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_version_table_lives_in_the_schema_of_the_tables(postgres_settings: Settings) -> None:
    settings = postgres_settings
    migrations.upgrade(settings)

    [(schema,)] = run(settings, "SELECT current_schema()")
    rows = run(
        settings,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = :schema",
        schema=schema,
    )

    assert schema.startswith("t_")
    assert {name for (name,) in rows} == MIGRATED_TABLES


def test_migrations_work_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    monkeypatch.chdir(tmp_path)

    migrations.upgrade(settings)

    assert migrations.is_current(settings)


def test_missing_alembic_folder_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrations, "_ROOT", tmp_path)

    with pytest.raises(ConfigurationError, match=r"alembic\.ini"):
        migrations.upgrade(Settings(data_dir=tmp_path))


def test_alembic_command_line_upgrades_the_configured_database(tmp_path: Path) -> None:
    database = tmp_path / "cli-history.db"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    environment["TASKS_DATABASE_URL"] = f"sqlite:///{database}"
    environment["TASKS_DATA_DIR"] = str(tmp_path / "data")  # importing the package writes there
    alembic = Path(sys.executable).parent / "alembic"

    completed = subprocess.run(
        [str(alembic), "upgrade", "head"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{database}")
    assert table_names(settings) == MIGRATED_TABLES
    assert migrations.current(settings) == HEAD
