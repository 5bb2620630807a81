"""Audit entries name who acted; the command line's actor comes from the settings."""

from __future__ import annotations

import getpass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from tasks_platform.audit import actor_from_environment, record_action
from tasks_platform.history.database import create_history_engine
from tasks_platform.history.models import AuditEntry, Base
from tasks_platform.settings import Settings


def test_the_configured_actor_wins_over_the_os_user(tmp_path: Path) -> None:
    assert actor_from_environment(Settings(data_dir=tmp_path, actor=" ops-alice ")) == "ops-alice"


def test_without_a_configured_actor_the_os_user_is_named(tmp_path: Path) -> None:
    assert actor_from_environment(Settings(data_dir=tmp_path)) == f"cli:{getpass.getuser()}"


def test_an_action_is_written_with_the_callers_transaction(tmp_path: Path) -> None:
    engine = create_history_engine(Settings(data_dir=tmp_path))
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            record_action(
                session, actor="a", action="dlq.replay", target="email", detail={"ids": ["x"]}
            )
            session.rollback()  # not committed: nothing kept
            record_action(session, actor="b", action="queue.pause", target="ai", reason="deploy")
            session.commit()
        with Session(engine) as session:
            rows = session.scalars(sa.select(AuditEntry)).all()
            assert [(r.actor, r.action, r.target, r.reason) for r in rows] == [
                ("b", "queue.pause", "ai", "deploy")
            ]
            assert rows[0].at is not None
    finally:
        engine.dispose()
