"""Every error as the API's one JSON error shape (see :mod:`tasks_platform.api.errors`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks_platform.api.errors import PLATFORM_ERRORS, ApiError, error_body
from tasks_platform.errors import PlatformError
from tasks_platform.stats import BROKER_ERRORS

log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, *, details: Sequence[Any] | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, FastAPI's and Starlette's included, in the one JSON shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(PlatformError, _platform_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    for kind in BROKER_ERRORS:
        if issubclass(kind, Exception):
            app.add_exception_handler(kind, _broker_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message)


async def _platform_error(request: Request, exc: Exception) -> JSONResponse:
    for kind, status, code in PLATFORM_ERRORS:
        if isinstance(exc, kind):
            return error_response(status, code, str(exc))
    return await _unexpected_error(request, exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if any(error.get("type") == "json_invalid" for error in exc.errors()):
        return error_response(422, "malformed_body", "the request body is not valid JSON")
    details = [
        {
            "where": ".".join(str(part) for part in error.get("loc", ())),
            "problem": str(error["msg"]).removeprefix("Value error, "),
        }
        for error in exc.errors()[:20]
    ]
    summary = "; ".join(f"{d['where']}: {d['problem']}" for d in details[:5])
    return error_response(422, "invalid_request", f"invalid request: {summary}", details=details)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = str(exc.detail) if exc.detail else code.replace("_", " ")
    if exc.status_code == 400 and "parsing the body" in message:
        code, message = "malformed_body", "the request body is not valid JSON"
    response = error_response(exc.status_code, code, message)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("history database error: %r", exc)
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
    return error_response(503, "database_unavailable", f"the history database failed: {text}")


async def _broker_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("broker error: %r", exc)
    text = " ".join(str(exc).split())[:200]
    return error_response(503, "broker_unavailable", f"the broker failed: {text}")


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error answering a request", exc_info=exc)
    return error_response(500, "internal_error", "internal error (logged on the server)")
