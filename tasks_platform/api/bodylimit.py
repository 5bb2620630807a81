"""Refusing request bodies over a size limit (413), before they are read into memory.

A declared ``Content-Length`` over the limit is refused at once. A body sent without one
(chunked) is counted as it arrives; once it passes the limit the application's own answer is
dropped and replaced by the 413, whatever the application made of the cut-off body.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasks_platform.api.errors import error_body


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a body passes the limit."""


class BodyLimit:
    """ASGI middleware: bodies larger than ``limit`` bytes get a JSON 413."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and (declared < 0 or declared > self.limit):
            await self._refuse(send, declared)
            return
        guard = _Guard(receive, send, self.limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.over:
                raise
        if guard.over and not guard.started:
            await self._refuse(send, guard.received)

    async def _refuse(self, send: Send, size: int) -> None:
        status, code = 413, "payload_too_large"
        message = f"request body of {size} bytes or more is over the limit of {self.limit} bytes"
        if size < 0:
            status, code, message = 400, "bad_request", "invalid Content-Length header"
        body = json.dumps(error_body(code, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Guard:
    """Counts one request's body as it arrives, and holds back the answer once it is over."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.received = 0
        self.over = False
        self.started = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.over = True
                raise BodyTooLarge
        return message

    async def send(self, message: Message) -> None:
        if self.over:
            return  # the application's answer to a cut-off body is replaced by the 413
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None
