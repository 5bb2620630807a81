"""The outbox's rules on the embedded SQLite history (no server): the job is added to the
caller's transaction and never committed there, validated like ``delay()``, idempotent by key,
kept as JSON with an absolute eta, refused on another database; and the relay's bookkeeping
(claim, mark published, pending, the duplicate check, pruning)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from tasks_platform import create_app
from tasks_platform.errors import ConfigurationError, IdempotencyConflict, InvalidPayload
from tasks_platform.history.migrations import upgrade
from tasks_platform.history.models import Job, OutboxMessage
from tasks_platform.outbox import is_pending, pending
from tasks_platform.outbox.store import claim, claim_delivery, mark_published, prune
from tasks_platform.outbox.submit import sessions_for
from tasks_platform.settings import Settings


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings)
    made = create_app(settings, set_as_current=False)
    yield made
    made.close()


def rows(app: Any) -> int:
    with sessions_for(app)() as session:
        return int(session.execute(select(func.count()).select_from(OutboxMessage)).scalar_one())


def test_apply_in_adds_the_job_to_the_callers_transaction_without_committing(app: Any) -> None:
    with sessions_for(app)() as session:
        job = app.tasks["demo.work"].apply_in(session, kwargs={"label": "a"})
        assert session.in_transaction()
        assert session.get(Job, job.id).state == "pending"
        session.rollback()
    assert rows(app) == 0
    with sessions_for(app).begin() as session:
        job = app.tasks["demo.work"].delay_in(session, label="b")
    with sessions_for(app)() as session:
        assert is_pending(session, job.id)
        message = session.get(OutboxMessage, job.id).message
    assert message["task"] == "demo.work"
    assert message["kwargs"]["label"] == "b"  # the validated payload


def test_an_invalid_payload_or_an_unstorable_option_adds_nothing(app: Any) -> None:
    with sessions_for(app).begin() as session:
        with pytest.raises(InvalidPayload):
            app.tasks["demo.work"].apply_in(session, kwargs={"label": "x", "unknown": 1})
        with pytest.raises(InvalidPayload, match="link"):
            app.tasks["demo.work"].apply_in(session, kwargs={}, link=app.tasks["demo.noop"].s())
        with pytest.raises(InvalidPayload, match="tenant"):
            app.tasks["demo.work"].apply_in(session, kwargs={}, tenant="no spaces allowed")
    assert rows(app) == 0


def test_a_repeated_idempotency_key_gives_the_first_job(app: Any) -> None:
    task = app.tasks["demo.work"]
    with sessions_for(app).begin() as session:
        first = task.apply_in(session, kwargs={"label": "1"}, idempotency_key="order-1")
    with sessions_for(app).begin() as session:
        again = task.apply_in(session, kwargs={"label": "2"}, idempotency_key="order-1")
        other_tenant = task.apply_in(session, kwargs={}, idempotency_key="order-1", tenant="acme")
    assert again.id == first.id
    assert other_tenant.id != first.id
    assert rows(app) == 2
    with sessions_for(app).begin() as session, pytest.raises(IdempotencyConflict):
        app.tasks["demo.noop"].apply_in(session, idempotency_key="order-1")


def test_a_countdown_becomes_an_eta_counted_from_acceptance(app: Any) -> None:
    before = datetime.now(UTC)
    with sessions_for(app).begin() as session:
        job = app.tasks["demo.work"].apply_in(session, kwargs={}, countdown=60)
    with sessions_for(app)() as session:
        options = session.get(OutboxMessage, job.id).message["options"]
    assert "countdown" not in options
    eta = datetime.fromisoformat(options["eta"])
    assert before + timedelta(seconds=59) < eta < datetime.now(UTC) + timedelta(seconds=61)


def test_a_session_on_another_database_is_refused(app: Any, tmp_path: Path) -> None:
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        with Session(other) as session, pytest.raises(ConfigurationError, match="history"):
            app.tasks["demo.work"].apply_in(session, kwargs={})
    finally:
        other.dispose()
    same = create_engine(app.settings.effective_database_url)  # another engine, same database
    try:
        with Session(same) as session, session.begin():
            app.tasks["demo.work"].apply_in(session, kwargs={})
    finally:
        same.dispose()
    assert rows(app) == 1


def test_claimed_rows_stay_pending_until_marked_published_and_are_pruned_later(
    app: Any,
) -> None:
    with sessions_for(app).begin() as session:
        ids = [app.tasks["demo.noop"].apply_in(session).id for _ in range(3)]
    with sessions_for(app).begin() as session:
        claimed = [row.id for row in claim(session, 2)]
        assert claimed == [row.id for row in pending(session)][:2]
        mark_published(session, claimed, datetime.now(UTC))
    with sessions_for(app)() as session:
        left = [row.id for row in pending(session)]
        assert len(left) == 1
        assert set(left) | set(claimed) == set(ids)
        assert pending(session, older_than=timedelta(hours=1)) == []
    with sessions_for(app).begin() as session:
        assert prune(session, older_than=timedelta(hours=1)) == 0
        assert prune(session, older_than=timedelta(seconds=-1)) == 2  # published ones only
    assert rows(app) == 1


def test_the_first_publish_delivered_runs_the_job_and_another_publish_is_a_duplicate(
    app: Any,
) -> None:
    with sessions_for(app).begin() as session:
        job_id = app.tasks["demo.noop"].apply_in(session).id
    with sessions_for(app).begin() as session:
        assert claim_delivery(session, job_id, "publish-1") is True
        assert claim_delivery(session, job_id, "publish-1") is True  # a redelivery of it
        assert claim_delivery(session, job_id, "publish-2") is False  # a second publish
        assert claim_delivery(session, "not-an-outbox-job", "publish-3") is None


def test_a_payment_is_committed_to_the_outbox_before_delay_returns(app: Any) -> None:
    charge = app.tasks["payments.charge"]
    payment = {"amount": 1250, "currency": "eur", "customer": "c-1"}
    first = charge.delay(**payment)
    repeated = charge.apply_async(kwargs=payment, idempotency_key="invoice-7")
    again = charge.apply_async(kwargs=payment, idempotency_key="invoice-7")
    with sessions_for(app)() as session:
        assert is_pending(session, first.id)  # in the outbox, not (yet) on the broker
        assert session.get(OutboxMessage, first.id).message["kwargs"]["currency"] == "EUR"
        assert is_pending(session, repeated.id)
    assert again.id == repeated.id
    assert rows(app) == 2
