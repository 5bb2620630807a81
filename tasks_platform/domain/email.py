"""Sending one e-mail over SMTP (``smtplib``), with the failures sorted into retry or not.

::

    server = SmtpServer(host="smtp.example.com", port=587, security=SmtpSecurity.STARTTLS,
                        user="app", password="...", timeout=30)
    mail = Mail(sender="Shop <shop@example.com>", to=("ana@example.org",), subject="Hi",
                text="Hello", message_id=message_id("job-42", "shop@example.com"))
    delivery = deliver(mail, server)   # Delivery(message_id, accepted, refused)

What can go wrong, and what it becomes:

- a temporary SMTP reply (4xx, e.g. ``451 try later``, ``421 closing``, ``454`` auth
  unavailable), every recipient refused with 4xx replies, a refused or reset connection, a
  timeout, a server that hangs up: :class:`~tasks_platform.errors.TransientError`;
- a permanent SMTP reply (5xx, e.g. ``550 no such user``, ``535`` authentication failed),
  every recipient refused for good, a server that lacks STARTTLS or AUTH, a TLS certificate
  that does not verify: :class:`~tasks_platform.errors.PermanentError`;
- some recipients refused and others accepted: the message went out, so this is a success;
  the refused ones are listed in :attr:`Delivery.refused` (sending again would duplicate it
  for the accepted ones).

The ``Message-ID`` is the caller's (derived from the job id by :func:`message_id`), so a job
that runs again after a crash sends a message with the same id, which receivers can use to
drop the duplicate. No password ever appears in an error message or in this module's logs.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from tasks_platform.errors import PermanentError, TransientError
from tasks_platform.settings import SmtpSecurity

logger = logging.getLogger(__name__)

#: ``Name <local@domain>`` or a bare ``local@domain``
_MAILBOX = re.compile(r"^(?:(?P<name>[^<>]*?)\s*<(?P<angle>[^<>\s]+)>|(?P<bare>[^<>\s]+))$")
_ADDR_SPEC = re.compile(r"^[^\s@<>()\[\],;:\\\"]{1,64}@(?=.{1,253}$)[\w-]+(?:\.[\w-]+)*$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_]")
#: headers this module writes itself (or that only a server may write)
RESERVED_HEADERS = frozenset(
    {
        "bcc", "cc", "content-disposition", "content-transfer-encoding", "content-type", "date",
        "from", "message-id", "mime-version", "received", "reply-to", "resent-bcc",
        "return-path", "sender", "subject", "to",
    }
)  # fmt: skip


def parse_mailbox(text: str) -> Address:
    """``Name <local@domain>`` or ``local@domain`` as an :class:`Address`; else ValueError."""
    if any(char in text for char in "\r\n\0"):
        raise ValueError("an e-mail address cannot contain line breaks")
    match = _MAILBOX.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an e-mail address (local@domain or Name <local@domain>)")
    addr_spec = match.group("angle") or match.group("bare")
    if not _ADDR_SPEC.match(addr_spec):
        raise ValueError(f"{addr_spec!r} is not an e-mail address (local@domain)")
    name = (match.group("name") or "").strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].replace('\\"', '"')
    try:
        return Address(display_name=name, addr_spec=addr_spec)
    except (ValueError, IndexError) as exc:  # the stdlib parser's verdict on the addr-spec
        raise ValueError(f"{addr_spec!r} is not an e-mail address: {exc}") from None


def check_header(name: str, value: str) -> None:
    """ValueError unless ``name: value`` is a custom header this module may write."""
    if not _HEADER_NAME.match(name):
        raise ValueError(f"header name {name!r} must be letters, digits and '-'")
    if name.lower() in RESERVED_HEADERS:
        raise ValueError(f"header {name!r} is set from the other fields; it cannot be given")
    if any(char in value for char in "\r\n\0") or len(value) > 998:
        raise ValueError(f"header {name!r}: one line of at most 998 characters")


def message_id(key: str, sender: str) -> str:
    """A ``Message-ID`` that depends only on ``key`` (a job id) and the sender's domain."""
    domain = parse_mailbox(sender).domain
    local = _ID_UNSAFE.sub("-", key)[:200] or "message"
    return f"<{local}@{domain}>"


@dataclass(frozen=True)
class SmtpServer:
    """Where and how to connect; the password is never shown (repr) nor logged."""

    host: str
    port: int
    security: SmtpSecurity = SmtpSecurity.STARTTLS
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0


@dataclass(frozen=True)
class Mail:
    """One message. Addresses are ``Name <local@domain>`` or ``local@domain``."""

    sender: str
    to: tuple[str, ...]
    subject: str
    message_id: str
    text: str | None = None
    html: str | None = None
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    def recipients(self) -> list[str]:
        """Every envelope recipient (To, Cc and Bcc), each once, in order."""
        addresses = (parse_mailbox(a).addr_spec for a in (*self.to, *self.cc, *self.bcc))
        return list(dict.fromkeys(addresses))


@dataclass(frozen=True)
class Refusal:
    """A recipient the server refused, with its reply."""

    address: str
    code: int
    reply: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "code": self.code, "reply": self.reply,
                "temporary": self.temporary}  # fmt: skip


@dataclass(frozen=True)
class Delivery:
    """What the server accepted: the message went out to ``accepted``."""

    message_id: str
    accepted: tuple[str, ...]
    refused: tuple[Refusal, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "accepted": list(self.accepted),
            "refused": [refusal.as_dict() for refusal in self.refused],
        }


def build_message(mail: Mail) -> EmailMessage:
    """The MIME message: text, HTML, or both as ``multipart/alternative``. No Bcc header."""
    if mail.text is None and mail.html is None:
        raise ValueError("a message needs a text body, an HTML body or both")
    message = EmailMessage()
    message["From"] = parse_mailbox(mail.sender)
    message["To"] = [parse_mailbox(a) for a in mail.to]
    if mail.cc:
        message["Cc"] = [parse_mailbox(a) for a in mail.cc]
    if mail.reply_to:
        message["Reply-To"] = [parse_mailbox(a) for a in mail.reply_to]
    message["Subject"] = mail.subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = mail.message_id
    for name, value in mail.headers:
        check_header(name, value)
        message[name] = value
    if mail.text is not None:
        message.set_content(mail.text)
        if mail.html is not None:
            message.add_alternative(mail.html, subtype="html")
    else:
        message.set_content(mail.html or "", subtype="html")
    return message


def deliver(mail: Mail, server: SmtpServer) -> Delivery:
    """Send ``mail`` through ``server``; TransientError or PermanentError when it did not go."""
    message = build_message(mail)
    recipients = mail.recipients()
    envelope_sender = parse_mailbox(mail.sender).addr_spec
    where = f"SMTP server {server.host}:{server.port}"
    try:
        refused = _send(server, message, envelope_sender, recipients)
    except smtplib.SMTPRecipientsRefused as exc:
        raise _all_refused(where, _refusals(exc.recipients)) from None
    except smtplib.SMTPResponseException as exc:
        raise _reply_error(where, exc) from None
    except smtplib.SMTPServerDisconnected as exc:
        if isinstance(exc.__context__, TimeoutError):  # smtplib reports a timeout this way
            raise TransientError(f"{where} did not answer within {server.timeout:g}s") from None
        raise TransientError(f"{where} closed the connection: {exc}") from None
    except smtplib.SMTPException as exc:  # no STARTTLS, no AUTH, no usable auth method ...
        raise PermanentError(f"{where}: {exc}") from None
    except ssl.SSLCertVerificationError as exc:
        raise PermanentError(f"{where}: TLS certificate refused: {exc.verify_message}") from None
    except TimeoutError:
        raise TransientError(f"{where} did not answer within {server.timeout:g}s") from None
    except OSError as exc:  # refused, reset, unreachable, TLS handshake cut short
        raise TransientError(f"{where} unreachable: {type(exc).__name__}: {exc}") from None
    refusals = _refusals(refused)
    accepted = tuple(r for r in recipients if r not in {x.address for x in refusals})
    for refusal in refusals:
        logger.warning("%s refused recipient %s of %s: %s %s", where, refusal.address,
                       mail.message_id, refusal.code, refusal.reply)  # fmt: skip
    return Delivery(message_id=mail.message_id, accepted=accepted, refused=refusals)


def _send(
    server: SmtpServer, message: EmailMessage, sender: str, recipients: list[str]
) -> dict[str, tuple[int, bytes]]:
    """One SMTP conversation; the recipients refused while others were accepted."""
    smtp = _connect(server)
    try:
        _secure(smtp, server)
        if server.user is not None:
            smtp.login(server.user, server.password or "")
        return smtp.send_message(message, sender, recipients)
    finally:
        _hang_up(smtp)


def _hang_up(smtp: smtplib.SMTP) -> None:
    """QUIT politely; whatever the server says to it changes nothing about the delivery."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError) as exc:
        logger.debug("SMTP QUIT failed (%s); connection closed", exc)
        smtp.close()


def _connect(server: SmtpServer) -> smtplib.SMTP:
    if server.security is SmtpSecurity.TLS:
        return smtplib.SMTP_SSL(server.host, server.port, timeout=server.timeout,
                                context=ssl.create_default_context())  # fmt: skip
    return smtplib.SMTP(server.host, server.port, timeout=server.timeout)


def _secure(smtp: smtplib.SMTP, server: SmtpServer) -> None:
    if server.security is SmtpSecurity.STARTTLS:
        smtp.ehlo()
        smtp.starttls(context=ssl.create_default_context())  # raises if it is not offered
        smtp.ehlo()


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(text.split())[:500]


def _refusals(refused: dict[str, tuple[int, bytes]]) -> tuple[Refusal, ...]:
    return tuple(Refusal(address, int(code), _text(reply)) for address, (code, reply)
                 in refused.items())  # fmt: skip


def _reply_error(where: str, exc: smtplib.SMTPResponseException) -> Exception:
    code, reply = int(exc.smtp_code), _text(exc.smtp_error)
    what = {
        smtplib.SMTPAuthenticationError: "refused the login",
        smtplib.SMTPSenderRefused: "refused the sender",
        smtplib.SMTPDataError: "refused the message",
        smtplib.SMTPConnectError: "refused the connection",
        smtplib.SMTPHeloError: "refused the greeting",
    }.get(type(exc), "answered")
    message = f"{where} {what}: {code} {reply}"
    if 500 <= code < 600:
        return PermanentError(message)
    return TransientError(message)  # 4xx, and whatever else no server should answer


def _all_refused(where: str, refusals: Iterable[Refusal]) -> Exception:
    listed = list(refusals)
    summary = "; ".join(f"{r.address}: {r.code} {r.reply}" for r in listed)
    if any(refusal.temporary for refusal in listed):  # worth another go (greylisting ...)
        return TransientError(f"{where} refused every recipient, some for now: {summary}")
    return PermanentError(f"{where} refused every recipient: {summary}")
