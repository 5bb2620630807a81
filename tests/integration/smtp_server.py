"""A real SMTP server for the tests (aiosmtpd, on 127.0.0.1) whose replies are scripted.

``server.refuse_rcpt("x@test", "451 4.3.0 try later", "250 OK")`` makes the next RCPT TO of
that address get those replies in turn (then 250 for good); ``server.refuse_data(...)`` does
the same for the DATA of a message addressed to it. Every command is counted per address, so
a test can tell how many attempts the server saw.
"""

from __future__ import annotations

import email
import email.policy
import socket
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass(frozen=True)
class Received:
    """A message the server accepted: its envelope, the login it came with, its content."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    login: str | None
    content: bytes

    @property
    def message(self) -> EmailMessage:
        """The message as parsed by the standard library (headers decoded)."""
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class ScriptedSmtp:
    """The handler: scripted replies per recipient, a record of every attempt."""

    def __init__(self, *, user: str | None = None, password: str | None = None) -> None:
        self.user, self.password = user, password
        self._lock = threading.Lock()
        self._rcpt_replies: dict[str, deque[str]] = defaultdict(deque)
        self._data_replies: dict[str, deque[str]] = defaultdict(deque)
        self.rcpt_attempts: Counter[str] = Counter()
        self.data_attempts: Counter[str] = Counter()
        #: the Message-ID of every DATA the server saw, accepted or not
        self.data_message_ids: list[str] = []
        self.received: list[Received] = []
        self.logins: list[tuple[str, bool]] = []

    # -- scripting ---------------------------------------------------------------------------
    def refuse_rcpt(self, address: str, *replies: str) -> None:
        with self._lock:
            self._rcpt_replies[address.lower()].extend(replies)

    def refuse_data(self, address: str, *replies: str) -> None:
        with self._lock:
            self._data_replies[address.lower()].extend(replies)

    def messages_to(self, address: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if address.lower() in map(str.lower, r.rcpt_tos)]

    # -- aiosmtpd hooks ----------------------------------------------------------------------
    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:  # fmt: skip
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == self.user
            and auth_data.password.decode() == self.password
        )
        with self._lock:
            login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
            self.logins.append((login, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:  # fmt: skip
        key = address.lower()
        with self._lock:
            self.rcpt_attempts[key] += 1
            scripted = self._rcpt_replies[key]
            reply = scripted.popleft() if scripted else "250 OK"
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = bytes(envelope.original_content or envelope.content)
        message_id = str(email.message_from_bytes(content).get("Message-ID", ""))
        with self._lock:
            self.data_message_ids.append(message_id)
            reply = "250 OK"
            for address in envelope.rcpt_tos:
                self.data_attempts[address.lower()] += 1
                scripted = self._data_replies[address.lower()]
                if scripted and reply.startswith("250"):
                    reply = scripted.popleft()
            if reply.startswith("250"):
                login = session.auth_data.login.decode() if session.authenticated else None
                self.received.append(Received(envelope.mail_from, tuple(envelope.rcpt_tos),
                                              login, content))  # fmt: skip
        return reply


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def smtp_server(handler: ScriptedSmtp) -> Iterator[int]:
    """Serve ``handler`` on 127.0.0.1 (AUTH offered without TLS, as on a local relay); the port."""
    port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        authenticator=handler.authenticate,
        auth_require_tls=False,
        decode_data=False,
    )
    controller.start()
    try:
        yield port
    finally:
        controller.stop()
