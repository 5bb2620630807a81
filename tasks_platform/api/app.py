"""The admin HTTP API: :func:`create_api` is the one place it is wired together.

::

    api = create_api(tasks_platform.app)     # a FastAPI (ASGI) application
    serve(api, host="127.0.0.1", port=8000)  # tasks_platform.api.server; or any ASGI server

Every route lives under ``/api/v1`` (see the routes package); the OpenAPI document is served
at ``/openapi.json``, with interactive docs at ``/docs`` and ``/redoc``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from tasks_platform.api import schemas
from tasks_platform.api.bodylimit import BodyLimit
from tasks_platform.api.context import ApiContext
from tasks_platform.api.handlers import install_error_handlers
from tasks_platform.api.routes import deadletters, jobs, operations, pages, usage, workflows
from tasks_platform.history.database import create_history_engine, session_factory

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

PREFIX = "/api/v1"
#: the history connections one API process may hold (requests run on a thread pool)
POOL = {"pool_size": 5, "max_overflow": 10, "pool_timeout": 10}

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": description}
    for status, description in (
        (401, "No, an invalid, expired or revoked token."),
        (403, "The token's role may not do this."),
        (404, "Not found (for a tenant token, also: another tenant's)."),
        (409, "Conflicts with the current state."),
        (413, "Request body too large."),
        (422, "Invalid request."),
        (503, "The broker or the history database is unavailable."),
    )
}

DESCRIPTION = """Operate tasks-platform over HTTP: submit jobs, follow them, cancel and retry
them, pause queues, read health and metrics, and work the dead-letter queues.

Every request but `/api/v1/live` needs `Authorization: Bearer <token>`; tokens are made with
`tasks-platform token create --name N --role admin|operator|tenant [--tenant T]`. Errors are
`{"error": {"code": "...", "message": "..."}}` with a stable code."""


def create_api(app: PlatformCelery | None = None) -> FastAPI:
    """The API of ``app`` (default: ``tasks_platform.app``, configured from TASKS_*)."""
    if app is None:
        import tasks_platform  # noqa: PLC0415 - builds the default app only when asked for

        app = tasks_platform.app
    engine = create_history_engine(app.settings, **POOL)
    context = ApiContext(app=app, engine=engine, sessions=session_factory(engine))

    @asynccontextmanager
    async def lifespan(_api: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.dispose()

    api = FastAPI(
        title="tasks-platform admin API",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url="/redoc",
    )
    api.state.context = context
    install_error_handlers(api)
    api.add_middleware(BodyLimit, limit=app.settings.api_max_body_bytes)
    routers = (operations.router, jobs.router, workflows.router, deadletters.router, usage.router)
    for router in routers:
        api.include_router(router, prefix=PREFIX, responses=_ERRORS)
    api.include_router(pages.router)
    return api


def _version() -> str:
    try:
        return version("tasks-platform")
    except PackageNotFoundError:
        return "0"
