"""API tokens and roles, on a throw-away SQLite database (no server)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tasks_platform.api.errors import InvalidToken, TokenNotFound
from tasks_platform.api.roles import PERMISSIONS, Permission, Role, allows
from tasks_platform.api.tokens import (
    SECRET_PREFIX,
    authenticate,
    create_token,
    hash_secret,
    revoke_token,
    token_status,
)
from tasks_platform.errors import InvalidPayload
from tasks_platform.history.models import ApiToken, AuditEntry, Base
from tasks_platform.intake import idempotent_id


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{tmp_path / 'tokens.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        yield session
    engine.dispose()


def test_a_token_is_stored_hashed_and_authenticates_as_its_role_and_tenant(
    session: Session,
) -> None:
    token, secret = create_token(session, name="shop", role="tenant", tenant="acme", actor="ana")
    session.commit()
    assert secret.startswith(SECRET_PREFIX)
    stored = session.scalars(select(ApiToken)).one()
    assert stored.token_hash == hash_secret(secret)
    assert secret not in (stored.token_hash, stored.id, stored.name)
    caller = authenticate(session, secret)
    assert (caller.token_id, caller.role, caller.tenant) == (token.id, Role.TENANT, "acme")
    assert caller.actor == f"api:shop/{token.id}"
    assert stored.last_used_at is not None
    audit = session.scalars(select(AuditEntry)).one()
    assert (audit.actor, audit.action, audit.target) == ("ana", "token.create", token.id)


def test_unknown_expired_and_revoked_tokens_do_not_authenticate(session: Session) -> None:
    now = datetime.now(UTC)
    _, expiring = create_token(session, name="a", role="admin", actor="t",
                               expires_in=timedelta(hours=1), now=now)  # fmt: skip
    revoked, revoked_secret = create_token(session, name="b", role="operator", actor="t")
    revoke_token(session, revoked.id, actor="t", reason="leaked")
    revoke_token(session, revoked.id, actor="t")  # twice: no second entry
    session.commit()
    assert authenticate(session, expiring, now=now + timedelta(minutes=59)).role is Role.ADMIN
    with pytest.raises(InvalidToken, match="expired"):
        authenticate(session, expiring, now=now + timedelta(hours=1))
    with pytest.raises(InvalidToken, match="revoked"):
        authenticate(session, revoked_secret)
    with pytest.raises(InvalidToken, match="invalid"):
        authenticate(session, SECRET_PREFIX + "guess")
    with pytest.raises(TokenNotFound):
        revoke_token(session, "tk_nope", actor="t")
    assert token_status(revoked) == "revoked"
    actions = session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)).all()
    assert actions == ["token.create", "token.create", "token.revoke"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "x", "role": "root"}, "unknown role"),
        ({"name": " ", "role": "admin"}, "name"),
        ({"name": "x", "role": "tenant"}, "needs its tenant"),
        ({"name": "x", "role": "operator", "tenant": "acme"}, "only tenant tokens"),
        ({"name": "x", "role": "tenant", "tenant": "a b"}, "tenant 'a b'"),
        ({"name": "x", "role": "admin", "expires_in": timedelta(0)}, "positive"),
    ],
)
def test_bad_token_requests_are_refused(
    session: Session, options: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidPayload, match=message):
        create_token(session, actor="t", **options)  # type: ignore[arg-type]
    assert session.scalars(select(ApiToken)).all() == []


def test_roles_follow_the_documented_table() -> None:
    assert PERMISSIONS[Role.ADMIN] == frozenset(Permission)
    operator = {p for p in Permission if allows(Role.OPERATOR, p)}
    tenant = {p for p in Permission if allows(Role.TENANT, p)}
    assert operator == {Permission.MONITOR, Permission.READ_JOBS, Permission.RETRY,
                        Permission.PAUSE, Permission.REPLAY}  # fmt: skip
    assert tenant == {Permission.READ_JOBS, Permission.SUBMIT, Permission.CANCEL}


def test_idempotency_ids_are_stable_and_scoped_per_tenant() -> None:
    assert idempotent_id("acme", "order-1") == idempotent_id("acme", "order-1")
    assert idempotent_id("acme", "order-1") != idempotent_id("globex", "order-1")
    assert idempotent_id(None, "order-1") != idempotent_id("acme", "order-1")
    assert idempotent_id("acme", "order-1") != idempotent_id("acme", "order-2")
