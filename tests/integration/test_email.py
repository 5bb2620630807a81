"""``email.send`` against a real SMTP server (aiosmtpd on 127.0.0.1) with scripted replies.

The domain tests call :func:`tasks_platform.domain.email.deliver` directly, to prove how each
SMTP failure is classified; the job tests run a real worker (Redis broker, PostgreSQL history)
and read what the server received and what the history recorded.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from conftest import Platform, wait_for
from control_helpers import control_platform, event_states, wait_state
from smtp_server import ScriptedSmtp, smtp_server
from sqlalchemy.orm import Session

from tasks_platform.domain.email import Mail, SmtpServer, deliver
from tasks_platform.errors import InvalidPayload, PermanentError, TransientError
from tasks_platform.history.models import Job, JobEvent
from tasks_platform.settings import SmtpSecurity

USER = "mailer"
PASSWORD = "s3cret-Pa55-9f1c7e"  # the secret that must never leak
SENDER = "Platform <noreply@platform.test>"


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[ScriptedSmtp, int]]:
    handler = ScriptedSmtp(user=USER, password=PASSWORD)
    with smtp_server(handler) as port:
        yield handler, port


def server(port: int, *, password: str = PASSWORD, **options: Any) -> SmtpServer:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": port, "security": SmtpSecurity.NONE,
                              "user": USER, "password": password, "timeout": 5}  # fmt: skip
    values.update(options)
    return SmtpServer(**values)


def mail(*to: str, subject: str = "Hello") -> Mail:
    return Mail(sender=SENDER, to=to, subject=subject, text="Hi.", message_id="<m-1@platform.test>")


# -- the domain: how each SMTP outcome is classified ------------------------------------------
def test_domain_delivers_and_reports_accepted_recipients(smtp: tuple[ScriptedSmtp, int]) -> None:
    handler, port = smtp
    delivery = deliver(mail("d1@example.org"), server(port))
    assert delivery.accepted == ("d1@example.org",)
    assert delivery.refused == ()
    assert handler.messages_to("d1@example.org")[0].login == USER


@pytest.mark.parametrize(
    ("script", "error", "message"),
    [
        (("refuse_data", "451 4.3.0 try later"), TransientError, "refused the message: 451"),
        (("refuse_data", "554 5.7.1 spam"), PermanentError, "refused the message: 554 5.7.1"),
        (("refuse_rcpt", "450 4.2.0 greylisted"), TransientError, "some for now.*450 4.2.0"),
        (("refuse_rcpt", "550 5.1.1 no such user"), PermanentError, "every recipient.*550 5.1.1"),
    ],
)
def test_domain_sorts_smtp_replies_into_transient_and_permanent(
    smtp: tuple[ScriptedSmtp, int], script: tuple[str, str], error: type[Exception], message: str
) -> None:
    handler, port = smtp
    address = f"{script[0]}-{script[1][:3]}@example.org"
    getattr(handler, script[0])(address, script[1])
    with pytest.raises(error, match=message):
        deliver(mail(address), server(port))
    assert handler.messages_to(address) == []


def test_domain_refused_login_is_permanent_and_never_shows_the_password(
    smtp: tuple[ScriptedSmtp, int],
) -> None:
    _, port = smtp
    with pytest.raises(PermanentError, match="refused the login: 535") as raised:
        deliver(mail("d2@example.org"), server(port, password="wrong-horse-battery"))
    assert "wrong-horse-battery" not in str(raised.value)
    assert "wrong-horse-battery" not in repr(server(port, password="wrong-horse-battery"))


def test_domain_server_without_starttls_is_permanent(smtp: tuple[ScriptedSmtp, int]) -> None:
    _, port = smtp
    with pytest.raises(PermanentError, match="STARTTLS"):
        deliver(mail("d3@example.org"), server(port, security=SmtpSecurity.STARTTLS))


def test_domain_connection_refused_is_transient() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransientError, match="unreachable: ConnectionRefusedError"):
        deliver(mail("d4@example.org"), server(port))


def test_domain_silent_server_times_out_as_transient() -> None:
    with socket.socket() as listener:  # accepts (the kernel does), never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(TransientError, match=r"did not answer within 0\.5s"):
            deliver(mail("d5@example.org"), server(port, timeout=0.5))


def test_domain_server_hanging_up_is_transient() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def hang_up() -> None:
            connection, _ = listener.accept()
            connection.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        with pytest.raises(TransientError, match="closed the connection"):
            deliver(mail("d6@example.org"), server(port))
        thread.join(timeout=5)


# -- the job, on a real worker ----------------------------------------------------------------
@pytest.fixture(scope="module")
def mailer(
    smtp: tuple[ScriptedSmtp, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """A Redis platform whose worker (threads) sends through the scripted server, with AUTH."""
    _, port = smtp
    tmp_path: Path = tmp_path_factory.mktemp("mailer")
    with control_platform(
        "redis", tmp_path, smtp_host="127.0.0.1", smtp_port=port, smtp_security="none",
        smtp_user=USER, smtp_password=PASSWORD, smtp_sender=SENDER, smtp_timeout=5,
        backoff_base=0.2, backoff_max=0.5,
    ) as platform:  # fmt: skip
        platform.worker(pool="threads", concurrency=2, queues=["email"])
        yield platform


def send(platform: Platform, **payload: Any) -> str:
    return str(platform.task("email.send").apply_async(kwargs=payload, tenant="acme").id)


def test_message_arrives_with_its_content_and_a_message_id_from_the_job_id(
    mailer: Platform, smtp: tuple[ScriptedSmtp, int]
) -> None:
    handler, _ = smtp
    job_id = send(
        mailer, to=["Ana <ana@example.org>"], cc=["cc@example.org"], bcc=["audit@example.org"],
        subject="Votre reçu de mars", text="Bonjour Ana,\nvoici la facture.",
        html="<p>Bonjour <b>Ana</b></p>", reply_to="billing@platform.test",
        headers={"X-Campaign": "spring-2026"},
    )  # fmt: skip
    job = wait_state(mailer, job_id, "succeeded", timeout=30)

    (received,) = handler.messages_to("ana@example.org")
    parsed = received.message
    assert received.mail_from == "noreply@platform.test"  # TASKS_SMTP_SENDER
    assert set(received.rcpt_tos) == {"ana@example.org", "cc@example.org", "audit@example.org"}
    assert received.login == USER
    assert parsed["Message-ID"] == f"<{job_id}@platform.test>"
    assert b"=?utf-8?" in received.content  # the subject is encoded on the wire ...
    assert parsed["Subject"] == "Votre reçu de mars"  # ... and decodes back
    assert parsed["From"] == SENDER
    assert parsed["To"] == "Ana <ana@example.org>"
    assert parsed["Cc"] == "cc@example.org"
    assert parsed["Bcc"] is None  # Bcc recipients are in the envelope only
    assert parsed["Reply-To"] == "billing@platform.test"
    assert parsed["X-Campaign"] == "spring-2026"
    assert parsed.get_content_type() == "multipart/alternative"
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None
    assert html is not None
    # SMTP carries lines ending in CRLF
    assert text.get_content().replace("\r\n", "\n") == "Bonjour Ana,\nvoici la facture.\n"
    assert html.get_content().replace("\r\n", "\n") == "<p>Bonjour <b>Ana</b></p>\n"

    assert job.result == {
        "message_id": f"<{job_id}@platform.test>",
        "accepted": ["ana@example.org", "cc@example.org", "audit@example.org"],
        "refused": [],
    }
    assert (job.queue, job.tenant, job.attempts) == ("email", "acme", 1)


@pytest.mark.parametrize(
    ("script", "replies"),
    [
        ("refuse_data", ("451 4.3.0 try later",)),
        ("refuse_rcpt", ("450 4.2.0 greylisted", "451 4.3.0 try later")),
    ],
)
def test_temporary_refusals_are_retried_until_the_message_goes(
    mailer: Platform, smtp: tuple[ScriptedSmtp, int], script: str, replies: tuple[str, ...]
) -> None:
    handler, _ = smtp
    address = f"busy-{script}@example.org"
    getattr(handler, script)(address, *replies)

    job_id = send(mailer, to=[address], subject="Retry me", text="t")
    job = wait_state(mailer, job_id, "succeeded", timeout=30)

    attempts = len(replies) + 1
    counted = handler.data_attempts if script == "refuse_data" else handler.rcpt_attempts
    assert counted[address] == attempts  # the server saw every attempt
    assert len(handler.messages_to(address)) == 1  # and took the message once
    assert job.attempts == attempts
    assert event_states(mailer, job_id).count("retrying") == attempts - 1
    if script == "refuse_data":  # the refused attempt carried the same Message-ID
        assert handler.data_message_ids.count(f"<{job_id}@platform.test>") == attempts


def test_permanent_refusal_is_dead_lettered_at_once(
    mailer: Platform, smtp: tuple[ScriptedSmtp, int]
) -> None:
    handler, _ = smtp
    address = "nobody@example.org"
    handler.refuse_rcpt(address, *["550 5.1.1 no such user"] * 5)

    job_id = send(mailer, to=[address], subject="Lost", text="t")
    job = wait_state(mailer, job_id, "dead", timeout=30)

    assert handler.rcpt_attempts[address] == 1
    assert job.attempts == 1
    assert job.dead_reason == "permanent_error"
    assert job.error_type == "PermanentError"
    assert "550 5.1.1 no such user" in (job.error_message or "")
    assert "retrying" not in event_states(mailer, job_id)
    letters = mailer.dead_letters().list("email")
    assert [letter.task_id for letter in letters] == [job_id]


def test_partly_refused_message_succeeds_and_names_the_refused_recipients(
    mailer: Platform, smtp: tuple[ScriptedSmtp, int]
) -> None:
    handler, _ = smtp
    handler.refuse_rcpt("gone@example.org", "550 5.1.1 no such user")

    job_id = send(mailer, to=["here@example.org", "gone@example.org"], subject="Half", text="t")
    job = wait_state(mailer, job_id, "succeeded", timeout=30)

    assert len(handler.messages_to("here@example.org")) == 1
    assert job.result["accepted"] == ["here@example.org"]
    assert job.result["refused"] == [
        {"address": "gone@example.org", "code": 550, "reply": "5.1.1 no such user",
         "temporary": False}
    ]  # fmt: skip


def test_invalid_payload_is_refused_before_anything_is_queued(mailer: Platform) -> None:
    with pytest.raises(InvalidPayload, match=r"to\.0: .*cannot contain line breaks"):
        send(mailer, to=["ana@example.org\r\nBcc: x@evil.test"], subject="s", text="t")
    with pytest.raises(InvalidPayload, match="give a text body, an html body or both"):
        send(mailer, to=["ana@example.org"], subject="s")


def test_the_password_never_reaches_the_history_or_the_worker_log(
    mailer: Platform, smtp: tuple[ScriptedSmtp, int]
) -> None:
    """Run last in this file, it also reads everything the jobs above left behind."""
    handler, _ = smtp
    job_id = send(mailer, to=["secret-check@example.org"], subject="s", text="t")
    wait_state(mailer, job_id, "succeeded", timeout=30)
    wait_for(lambda: handler.logins, 5, what="a login")
    assert (USER, True) in handler.logins  # AUTH was used, with the password

    with Session(mailer.history) as session:
        jobs = session.scalars(sqlalchemy.select(Job)).all()
        events = session.scalars(sqlalchemy.select(JobEvent)).all()
        dumped = [repr({c.key: getattr(row, c.key) for c in sqlalchemy.inspect(row).mapper.columns})
                  for row in [*jobs, *events]]  # fmt: skip
    assert any(job.id == job_id for job in jobs)
    assert len(events) >= 3
    assert all(PASSWORD not in text for text in dumped)
    log = mailer.logs()
    assert "email.send" in log  # the log is the worker's, and it is there
    assert PASSWORD not in log
