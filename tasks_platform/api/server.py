"""Serving the API with uvicorn (``tasks-platform api``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from tasks_platform.api.app import create_api
from tasks_platform.errors import ConfigurationError
from tasks_platform.history import migrations, recorder

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery
    from tasks_platform.settings import Settings


def check_database(settings: Settings) -> None:
    """Refuse to serve on a history database that is not at this release's schema.

    The embedded SQLite database is brought up to date instead, as the workers do.
    """
    if settings.effective_database_url.startswith("sqlite"):
        recorder.prepare_embedded_database(settings)
        return
    try:
        current = migrations.is_current(settings)
    except SQLAlchemyError as exc:
        text = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        raise ConfigurationError(f"the history database cannot be read: {text}") from exc
    if not current:
        raise ConfigurationError(
            "the history database is not at this release's schema: "
            "run `tasks-platform db upgrade` first"
        )


def serve(app: PlatformCelery, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve the API of ``app`` until SIGINT or SIGTERM; then finish what is in flight."""
    check_database(app.settings)
    config = uvicorn.Config(
        create_api(app),
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        recorder.close_all()  # write the history of the jobs this process submitted
