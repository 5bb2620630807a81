"""A real HTTP server on 127.0.0.1 whose answers a test scripts, and which records every request.

``ScriptedServer(routes)`` maps a path to a :class:`Script` (answers given in turn, then a
default one) or to any callable taking the :class:`Received` request and returning a
:class:`Reply`. A reply may run an action before it answers, or not answer at all (the
connection is closed), which is how a test kills a worker in the middle of a request.
:class:`PaymentProvider` is a fake payment provider that keeps charges by idempotency key.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    """One request as the server saw it; ``at`` is ``time.monotonic()`` on arrival."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: run before answering (with the request)
    action: Callable[[Received], None] | None = None
    #: close the connection without an answer
    drop: bool = False


Responder = Callable[[Received], Reply]


class Script:
    """Answers in turn, then ``then`` for every further request.

    An answer may be a responder, called when its request arrives (e.g. to date a header).
    """

    def __init__(self, *replies: Reply | Responder, then: Reply | None = None) -> None:
        self._replies = list(replies)
        self._then = then or Reply(200, {"ok": True})
        self._lock = threading.Lock()

    def __call__(self, received: Received) -> Reply:
        with self._lock:
            reply = self._replies.pop(0) if self._replies else self._then
        return reply if isinstance(reply, Reply) else reply(received)


class ScriptedServer:
    """``ThreadingHTTPServer`` on a free loopback port, in a thread; see the module docstring."""

    def __init__(self, routes: dict[str, Responder]) -> None:
        self.routes = routes
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)


def _handler_for(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            received = Received("POST", self.path, dict(self.headers.items()), body,
                                time.monotonic())  # fmt: skip
            server.record(received)
            responder = server.routes.get(self.path)
            reply = responder(received) if responder else Reply(404, {"error": "no such path"})
            if reply.action is not None:
                reply.action(received)
            if reply.drop:
                self.close_connection = True
                return
            self._answer(reply)

        def _answer(self, reply: Reply) -> None:
            content = b"" if reply.body is None else json.dumps(reply.body).encode()
            try:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if content:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)
            except OSError:
                self.close_connection = True  # the client went away (e.g. its worker was killed)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test reads server.requests

    return Handler


@contextmanager
def scripted_server(routes: dict[str, Responder]) -> Iterator[ScriptedServer]:
    server = ScriptedServer(routes).start()
    try:
        yield server
    finally:
        server.stop()


class PaymentProvider:
    """A fake provider: ``POST /charges`` stores one charge per ``Idempotency-Key``.

    A repeated key returns the stored charge (as Stripe does) and charges nothing. ``before``
    answers (in turn) come first, e.g. a 503; ``decline`` names customers whose card is
    declined (402); ``on_charge`` runs after the first charge is stored, before it is answered
    (``drop_first`` then leaves that request unanswered).
    """

    def __init__(
        self,
        *before: Reply,
        decline: frozenset[str] = frozenset(),
        on_charge: Callable[[], None] | None = None,
        drop_first: bool = False,
    ) -> None:
        self.charges: dict[str, dict[str, Any]] = {}
        self._before = list(before)
        self._decline = decline
        #: run after the first charge is stored, before it is answered (a test may set it late)
        self.on_charge = on_charge
        self._drop_first = drop_first
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, received: Received) -> Reply:
        with self._lock:
            if self._before:
                return self._before.pop(0)
            request = received.json()
            if request.get("customer") in self._decline:
                return Reply(402, {"error": {"code": "card_declined",
                                             "message": "Your card was declined."}})  # fmt: skip
            key = received.header("Idempotency-Key")
            if not key:
                return Reply(400, {"error": {"message": "an Idempotency-Key is required"}})
            if key in self.charges:
                return Reply(200, self.charges[key])
            self.charges[key] = {"id": f"ch_{next(self._ids)}", "status": "succeeded", **request}
            first = len(self.charges) == 1
        if first and self.on_charge is not None:
            self.on_charge()
            if self._drop_first:
                return Reply(drop=True)
        return Reply(201, self.charges[key])
