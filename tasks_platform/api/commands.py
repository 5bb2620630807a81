"""The ``tasks-platform api`` and ``tasks-platform token ...`` commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import click
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from tasks_platform.api.roles import Role
from tasks_platform.api.tokens import create_token, list_tokens, revoke_token, token_status
from tasks_platform.audit import actor_from_environment
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import ApiToken
from tasks_platform.history.recorder import prepare_embedded_database
from tasks_platform.history.repository import as_utc
from tasks_platform.settings import Settings
from tasks_platform.table import format_table


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")  # fmt: skip
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))  # fmt: skip
def api_command(host: str, port: int, log_level: str) -> None:
    """Serve the admin HTTP API (OpenAPI at /openapi.json, docs at /docs)."""
    import tasks_platform  # noqa: PLC0415 - the configured app
    from tasks_platform.api.server import serve  # noqa: PLC0415 - loads FastAPI and uvicorn

    serve(tasks_platform.app, host=host, port=port, log_level=log_level)


@click.group()
def token() -> None:
    """API tokens: create (the secret is shown once), list, revoke."""


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    from tasks_platform.cli import parse_duration  # noqa: PLC0415 - cli imports this module

    return parse_duration(value)


@token.command("create")
@click.option("--name", required=True, help="Who or what the token is for.")
@click.option("--role", required=True, type=click.Choice([r.value for r in Role]))
@click.option("--tenant", help="The tenant a tenant token acts for (tenant role only).")
@click.option("--expires-in", callback=_duration, metavar="DURATION",
              help="Lifetime: 90d, 12h ... (default: until revoked).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The token and its secret as JSON.")
def token_create(
    name: str, role: str, tenant: str | None, expires_in: timedelta | None, as_json: bool
) -> None:
    """Create a token. Prints its secret on stdout, once: it is stored only hashed."""
    settings = _settings()
    with _tokens(settings) as session:
        made, secret = create_token(
            session, name=name, role=role, tenant=tenant, expires_in=expires_in,
            actor=actor_from_environment(settings),
        )  # fmt: skip
        session.commit()
    if as_json:
        click.echo(json.dumps(_as_dict(made) | {"secret": secret}))
        return
    expiry = "never" if made.expires_at is None else _when(made.expires_at)
    click.echo(f"created token {made.id} ({made.role}{_of(made)}, expires {expiry}); "
               "its secret follows, shown only this once:", err=True)  # fmt: skip
    click.echo(secret)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def token_list(as_json: bool) -> None:
    """List tokens (never their secrets)."""
    with _tokens(_settings()) as session:
        tokens = list_tokens(session)
    if as_json:
        for item in tokens:
            click.echo(json.dumps(_as_dict(item)))
        return
    rows = [(t.id, t.name, t.role, t.tenant or "-", token_status(t), _when(t.created_at),
             _when(t.expires_at), _when(t.last_used_at)) for t in tokens]  # fmt: skip
    header = ("id", "name", "role", "tenant", "status", "created", "expires", "last used")
    click.echo(format_table(header, rows))
    click.echo(f"{len(tokens)} token(s)")


@token.command("revoke")
@click.argument("token_id")
@click.option("--reason", help="Why, for the audit log.")
def token_revoke(token_id: str, reason: str | None) -> None:
    """Revoke a token at once and for good."""
    settings = _settings()
    with _tokens(settings) as session:
        revoked = revoke_token(
            session, token_id, actor=actor_from_environment(settings), reason=reason
        )
        session.commit()
    click.echo(f"revoked token {revoked.id} ({revoked.name})")


def _settings() -> Settings:
    import tasks_platform  # noqa: PLC0415 - the configured app

    return tasks_platform.app.settings


@contextmanager
def _tokens(settings: Settings) -> Iterator[Session]:
    """A session on the history database, where the tokens live; errors as one clear line."""
    try:
        if settings.effective_database_url.startswith("sqlite"):
            prepare_embedded_database(settings)
        engine = create_history_engine(settings)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"history database: {_describe(exc)}") from exc
    try:
        with session_factory(engine)() as session:
            yield session
    except SQLAlchemyError as exc:
        hint = ""
        if "does not exist" in str(exc) or "no such table" in str(exc):
            hint = " (not migrated? run: tasks-platform db upgrade)"
        raise click.ClickException(f"history database: {_describe(exc)}{hint}") from exc
    finally:
        engine.dispose()


def _describe(exc: SQLAlchemyError) -> str:
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]


def _as_dict(item: ApiToken) -> dict[str, str | None]:
    moments = {key: getattr(item, key) for key in
               ("created_at", "expires_at", "revoked_at", "last_used_at")}  # fmt: skip
    return {"id": item.id, "name": item.name, "role": item.role, "tenant": item.tenant,
            "status": token_status(item)} | {
        key: None if value is None else as_utc(value).isoformat() for key, value in moments.items()
    }  # fmt: skip


def _of(item: ApiToken) -> str:
    return "" if item.tenant is None else f" of tenant {item.tenant}"


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else as_utc(moment).strftime("%Y-%m-%d %H:%M:%S")
