"""Bearer tokens of the admin API: created, listed and revoked from the command line.

A token is shown once, when it is created; the database keeps only the SHA-256 of its secret
(``api_tokens.token_hash``), so a leaked database does not leak usable tokens. Each token has
one role (see :mod:`tasks_platform.api.roles`) and, for the ``tenant`` role, the one tenant it
acts for. Creating and revoking a token are audited. Functions take a Session and never
commit: the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from tasks_platform.api.errors import InvalidToken, TokenNotFound
from tasks_platform.api.roles import Role
from tasks_platform.audit import record_action
from tasks_platform.errors import InvalidPayload
from tasks_platform.history.models import ApiToken
from tasks_platform.history.repository import as_utc

#: every secret starts with this, so that a leaked one is recognisable (secret scanners)
SECRET_PREFIX = "tpk_"  # noqa: S105 - a prefix, not a secret
#: how stale ``last_used_at`` may get before a request refreshes it (not a write per request)
TOUCH_INTERVAL = timedelta(minutes=1)
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
_NAME_MAX = 200


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the token's id, name, role and (for ``tenant``) tenant."""

    token_id: str
    name: str
    role: Role
    tenant: str | None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"api:{self.name}/{self.token_id}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.match(tenant):
        raise InvalidPayload(
            f"tenant {tenant!r} must be 1-200 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return tenant


def create_token(
    session: Session,
    *,
    name: str,
    role: Role | str,
    tenant: str | None = None,
    expires_in: timedelta | None = None,
    actor: str,
    now: datetime | None = None,
) -> tuple[ApiToken, str]:
    """A new token and its secret (shown once); InvalidPayload for a bad name, role or tenant."""
    role = Role.parse(role)
    name = name.strip()
    if not name or len(name) > _NAME_MAX:
        raise InvalidPayload(f"a token name is 1-{_NAME_MAX} characters")
    if role is Role.TENANT and tenant is None:
        raise InvalidPayload("a tenant token needs its tenant (--tenant)")
    if role is not Role.TENANT and tenant is not None:
        raise InvalidPayload(f"only tenant tokens belong to a tenant, not {role.value} tokens")
    if tenant is not None:
        check_tenant(tenant)
    if expires_in is not None and expires_in <= timedelta(0):
        raise InvalidPayload("a token's lifetime must be positive")
    now = now or datetime.now(UTC)
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        id=f"tk_{secrets.token_hex(6)}",
        name=name,
        token_hash=hash_secret(secret),
        role=role.value,
        tenant=tenant,
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
    )
    session.add(token)
    expires = None if token.expires_at is None else token.expires_at.isoformat()
    detail = {"name": name, "role": role.value, "tenant": tenant, "expires_at": expires}
    record_action(session, actor=actor, action="token.create", target=token.id, detail=detail)
    return token, secret


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, revoked and expired ones included, oldest first."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)))


def revoke_token(
    session: Session,
    token_id: str,
    *,
    actor: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> ApiToken:
    """Revoke a token for good (TokenNotFound if unknown); revoking twice changes nothing."""
    token = session.get(ApiToken, token_id)
    if token is None:
        raise TokenNotFound(f"no API token with id {token_id!r}")
    if token.revoked_at is None:
        token.revoked_at = now or datetime.now(UTC)
        record_action(session, actor=actor, action="token.revoke", target=token.id, reason=reason)
    return token


def authenticate(session: Session, secret: str, *, now: datetime | None = None) -> Principal:
    """The caller a secret stands for; InvalidToken if unknown, expired or revoked."""
    now = now or datetime.now(UTC)
    token = session.scalars(
        select(ApiToken).where(ApiToken.token_hash == hash_secret(secret))
    ).one_or_none()
    if token is None:
        raise InvalidToken("invalid API token")
    if token.revoked_at is not None:
        raise InvalidToken("this API token was revoked")
    if token.expires_at is not None and as_utc(token.expires_at) <= now:
        raise InvalidToken("this API token has expired")
    last = token.last_used_at
    if last is None or now - as_utc(last) >= TOUCH_INTERVAL:
        token.last_used_at = now
    return Principal(token.id, token.name, Role(token.role), token.tenant)


def token_status(token: ApiToken, *, now: datetime | None = None) -> str:
    """``active``, ``expired`` or ``revoked``."""
    now = now or datetime.now(UTC)
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and as_utc(token.expires_at) <= now:
        return "expired"
    return "active"
