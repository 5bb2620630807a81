"""The ``email`` family: ``email.send`` sends one message through the configured SMTP server.

::

    tasks_platform.submit("email.send", {
        "to": ["ana@example.org"], "subject": "Your invoice", "text": "Hello Ana ...",
        "html": "<p>Hello Ana ...</p>", "from": "Shop <shop@example.com>",
    })

Temporary SMTP failures (4xx replies, connection problems, timeouts) are retried with backoff;
permanent ones (5xx) dead-letter the job at once. The ``Message-ID`` is derived from the job
id, so a job delivered twice sends the same ``Message-ID`` twice.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from tasks_platform.domain.email import (
    Mail,
    SmtpServer,
    check_header,
    deliver,
    message_id,
    parse_mailbox,
)
from tasks_platform.errors import PermanentError
from tasks_platform.jobs.declaration import JobContext, job
from tasks_platform.jobs.retry import RetryPolicy
from tasks_platform.settings import Settings

#: recipients of one message, To, Cc and Bcc together
MAX_RECIPIENTS = 100


def _mailbox(value: str) -> str:
    parse_mailbox(value)
    return value.strip()


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Mailbox = Annotated[str, AfterValidator(_mailbox)]
Mailboxes = Annotated[list[Mailbox], BeforeValidator(_listed)]


class SendEmail(BaseModel):
    """One message. Addresses: ``local@domain`` or ``Name <local@domain>``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    to: Mailboxes = Field(min_length=1, max_length=MAX_RECIPIENTS)
    cc: Mailboxes = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: Mailboxes = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    subject: str = Field(max_length=998)
    text: str | None = None
    html: str | None = None
    reply_to: Mailboxes = Field(default_factory=list, max_length=10)
    #: the From address; TASKS_SMTP_SENDER when not given
    sender: Mailbox | None = Field(default=None, alias="from")
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)

    @model_validator(mode="after")
    def _check(self) -> SendEmail:
        if self.text is None and self.html is None:
            raise ValueError("give a text body, an html body or both")
        if any(char in self.subject for char in "\r\n\0"):
            raise ValueError("the subject cannot contain line breaks")
        if len(self.to) + len(self.cc) + len(self.bcc) > MAX_RECIPIENTS:
            raise ValueError(f"at most {MAX_RECIPIENTS} recipients (to, cc and bcc together)")
        for name, value in self.headers.items():
            check_header(name, value)
        return self


def smtp_server(settings: Settings) -> SmtpServer:
    """The SMTP server of the settings; PermanentError when they cannot work."""
    password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
    if settings.smtp_user and password is None:
        raise PermanentError("TASKS_SMTP_USER is set but TASKS_SMTP_PASSWORD is not")
    if password is not None and not settings.smtp_user:
        raise PermanentError("TASKS_SMTP_PASSWORD is set but TASKS_SMTP_USER is not")
    return SmtpServer(host=settings.smtp_host, port=settings.smtp_port,
                      security=settings.smtp_security, user=settings.smtp_user or None,
                      password=password, timeout=settings.smtp_timeout)  # fmt: skip


def sender_of(payload: SendEmail, settings: Settings) -> str:
    """The From address: the payload's, else TASKS_SMTP_SENDER; PermanentError if neither."""
    if payload.sender:
        return payload.sender
    if not settings.smtp_sender:
        raise PermanentError(
            "email.send has no sender: give 'from' in the payload or set TASKS_SMTP_SENDER"
        )
    try:
        parse_mailbox(settings.smtp_sender)
    except ValueError as exc:
        raise PermanentError(f"TASKS_SMTP_SENDER is not an e-mail address: {exc}") from None
    return settings.smtp_sender


@job(
    "email.send",
    queue="email",
    schema=SendEmail,
    # backoff from TASKS_BACKOFF_*: with the defaults, 8 retries span about 4 to 8 minutes
    # (jitter), longer than a typical greylisting delay
    retry=RetryPolicy(max_retries=8),
    bind=True,
)
def send(context: JobContext, payload: SendEmail) -> dict[str, object]:
    """Send the message; the result names its Message-ID and the accepted/refused recipients."""
    settings = context.settings
    sender = sender_of(payload, settings)
    mail = Mail(
        sender=sender,
        to=tuple(payload.to),
        cc=tuple(payload.cc),
        bcc=tuple(payload.bcc),
        reply_to=tuple(payload.reply_to),
        subject=payload.subject,
        text=payload.text,
        html=payload.html,
        headers=tuple(payload.headers.items()),
        message_id=message_id(context.id, sender),
    )
    return deliver(mail, smtp_server(settings)).as_dict()
