"""email.send without a server: address checks, the payload schema, the MIME message built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tasks_platform.domain.email import Mail, build_message, message_id, parse_mailbox
from tasks_platform.errors import PermanentError
from tasks_platform.jobs.email import SendEmail, sender_of, smtp_server
from tasks_platform.settings import Settings

BASE: dict[str, Any] = {"to": ["ana@example.org"], "subject": "Hi", "text": "Hello"}


@pytest.mark.parametrize(
    ("text", "name", "address"),
    [
        ("ana@example.org", "", "ana@example.org"),
        ("  Ana <ana@example.org> ", "Ana", "ana@example.org"),
        ('"Doe, Jane" <jane.doe+news@mail.example.org>', "Doe, Jane",
         "jane.doe+news@mail.example.org"),
        ("Zoë <zoe@example.org>", "Zoë", "zoe@example.org"),
        ("root@localhost", "", "root@localhost"),
    ],
)  # fmt: skip
def test_addresses_are_bare_or_with_a_display_name(text: str, name: str, address: str) -> None:
    parsed = parse_mailbox(text)
    assert (parsed.display_name, parsed.addr_spec) == (name, address)


@pytest.mark.parametrize(
    "text",
    ["", "ana", "ana@", "@example.org", "ana example@org", "a@b@c", "<ana@example.org",
     "Ana <ana@example.org> <bob@example.org>", "ana@example.org\r\nBcc: eve@evil.test",
     "ana@exa mple.org", "ana@example..org", "ana,bob@example.org"],
)  # fmt: skip
def test_anything_else_is_not_an_address(text: str) -> None:
    with pytest.raises(ValueError, match="e-mail address"):
        parse_mailbox(text)


def test_message_id_depends_only_on_the_key_and_the_sender_domain() -> None:
    first = message_id("0b8e-41c2", "Shop <shop@shop.example>")
    assert first == "<0b8e-41c2@shop.example>"
    assert message_id("0b8e-41c2", "other@shop.example") == first
    assert message_id("a b<c>", "x@shop.example") == "<a-b-c-@shop.example>"


def mail(**changes: Any) -> Mail:
    values: dict[str, Any] = {
        "sender": "Shop <shop@shop.example>",
        "to": ("Ana <ana@example.org>",),
        "subject": "Hi",
        "message_id": "<k@shop.example>",
        "text": "Hello",
    }
    values.update(changes)
    return Mail(**values)


def test_text_only_message() -> None:
    message = build_message(mail())
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "Hello\n"
    assert message["Message-ID"] == "<k@shop.example>"
    assert message["From"] == "Shop <shop@shop.example>"
    assert message["Date"]


def test_html_only_message() -> None:
    message = build_message(mail(text=None, html="<p>Hello</p>"))
    assert message.get_content_type() == "text/html"


def test_text_and_html_are_alternatives_and_bcc_stays_off_the_headers() -> None:
    message = build_message(mail(html="<p>Hello</p>", cc=("c@example.org",),
                                 bcc=("b@example.org",), reply_to=("r@shop.example",),
                                 headers=(("X-Campaign", "spring"),)))  # fmt: skip
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert message["Cc"] == "c@example.org"
    assert message["Bcc"] is None
    assert message["Reply-To"] == "r@shop.example"
    assert message["X-Campaign"] == "spring"


def test_envelope_recipients_are_to_cc_and_bcc_once_each() -> None:
    many = mail(to=("Ana <ana@example.org>", "bob@example.org"), cc=("ana@example.org",),
                bcc=("audit@example.org",))  # fmt: skip
    assert many.recipients() == ["ana@example.org", "bob@example.org", "audit@example.org"]


def test_payload_takes_from_and_gives_it_back_under_that_name() -> None:
    payload = SendEmail.model_validate({**BASE, "from": "Shop <shop@shop.example>",
                                        "reply_to": "r@shop.example"})  # fmt: skip
    assert payload.sender == "Shop <shop@shop.example>"
    assert payload.reply_to == ["r@shop.example"]  # one address is a list of one
    dumped = payload.model_dump(mode="json")
    assert dumped["from"] == "Shop <shop@shop.example>"
    assert SendEmail.model_validate(dumped) == payload  # what travels validates again


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"to": []}, "to\n  List should have at least 1 item"),
        ({"to": ["nope"]}, "to.0\n  Value error, 'nope' is not an e-mail address"),
        ({"cc": ["x@y.z", "bad"]}, "cc.1\n  Value error"),
        ({"text": None}, "give a text body, an html body or both"),
        ({"subject": "Hi\r\nBcc: eve@evil.test"}, "subject cannot contain line breaks"),
        ({"headers": {"Bcc": "eve@evil.test"}}, "header 'Bcc' is set from the other fields"),
        ({"headers": {"X-Ok": "a\nb"}}, "one line of at most 998"),
        ({"headers": {"X Bad": "v"}}, "letters, digits and '-'"),
        ({"to": [f"u{n}@example.org" for n in range(60)],
          "bcc": [f"b{n}@example.org" for n in range(60)]}, "at most 100 recipients"),
        ({"sender": "x@y.z", "priority": 1}, "Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_payloads_that_cannot_be_sent_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SendEmail.model_validate({**BASE, **changes})


def test_sender_comes_from_the_payload_else_the_settings_else_it_is_permanent(
    tmp_path: Path,
) -> None:
    bare = Settings(data_dir=tmp_path)
    configured = Settings(data_dir=tmp_path, smtp_sender="Ops <ops@shop.example>")
    mine = SendEmail.model_validate({**BASE, "from": "me@shop.example"})
    theirs = SendEmail.model_validate(BASE)

    assert sender_of(mine, bare) == "me@shop.example"
    assert sender_of(theirs, configured) == "Ops <ops@shop.example>"
    with pytest.raises(PermanentError, match="give 'from' in the payload or set TASKS_SMTP_SENDER"):
        sender_of(theirs, bare)
    with pytest.raises(PermanentError, match="TASKS_SMTP_SENDER is not an e-mail address"):
        sender_of(theirs, Settings(data_dir=tmp_path, smtp_sender="ops"))


def test_smtp_server_comes_from_the_settings_and_hides_the_password(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, smtp_host="mail.example", smtp_port=465,
                        smtp_security="tls", smtp_user="app", smtp_password="pw-123456",
                        smtp_timeout=7)  # fmt: skip
    server = smtp_server(settings)
    assert (server.host, server.port, server.security.value, server.user, server.timeout) == (
        "mail.example", 465, "tls", "app", 7)  # fmt: skip
    assert server.password == "pw-123456"
    assert "pw-123456" not in repr(server)
    with pytest.raises(PermanentError, match="TASKS_SMTP_USER is set but TASKS_SMTP_PASSWORD"):
        smtp_server(Settings(data_dir=tmp_path, smtp_user="app"))
    with pytest.raises(PermanentError, match="TASKS_SMTP_PASSWORD is set but TASKS_SMTP_USER"):
        smtp_server(Settings(data_dir=tmp_path, smtp_password="pw-123456"))
