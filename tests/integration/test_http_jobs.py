"""ai.generate, webhooks.deliver and payments.charge against a scripted HTTP server.

Real workers on Redis with a PostgreSQL history; the server (127.0.0.1) answers as each test
scripts it and records every request with its arrival time, so retries, Retry-After delays,
signatures and idempotency keys are measured where they arrive. The backoff base is 6 s (a
first retry waits 3-6 s), so a retry that comes sooner than 3 s honoured a Retry-After.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from conftest import SHORT_VISIBILITY_REDIS_URL, Platform, wait_for
from control_helpers import control_platform, event_states, wait_state
from event_tap import EventTap
from scripted_http import (
    PaymentProvider,
    Received,
    Reply,
    Script,
    ScriptedServer,
    scripted_server,
)
from sqlalchemy.orm import Session

from tasks_platform.domain.webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify_signature,
)
from tasks_platform.history.models import Job, JobEvent

AI_KEY = "sk-settings-key-4f9a1c"
JOB_AI_KEY = "sk-job-key-88d2e7"
WEBHOOK_SECRET = "whsec-settings-31c5"
JOB_WEBHOOK_SECRET = "whsec-job-77ab"
PAY_KEY = "pk-live-secret-5e0d"
SECRETS = (AI_KEY, JOB_AI_KEY, WEBHOOK_SECRET, JOB_WEBHOOK_SECRET, PAY_KEY)
BACKOFF_BASE = 6.0
CHAT = "/v1/chat/completions"


def completion(text: str = "Hello there.", prompt_tokens: int = 9, completion_tokens: int = 3,
               model: str = "tiny-1") -> Reply:  # fmt: skip
    return Reply(200, {
        "id": "chatcmpl-1", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    with scripted_server({}) as server:
        yield server


@pytest.fixture(scope="module")
def platform(
    server: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    settings = {
        "backoff_base": BACKOFF_BASE,
        "backoff_max": 60.0,
        "ai_base_url": f"{server.url}/v1",
        "ai_api_key": AI_KEY,
        "webhook_secret": WEBHOOK_SECRET,
        "payments_base_url": f"{server.url}/pay",
        "payments_api_key": PAY_KEY,
    }
    with control_platform("redis", tmp_path_factory.mktemp("http-jobs"), **settings) as made:
        made.worker(concurrency=2, queues=["ai", "webhooks", "payments"])
        yield made


def gaps(requests: list[Received]) -> list[float]:
    return [later.at - earlier.at for earlier, later in itertools.pairwise(requests)]


def assert_no_secrets(platform: Platform, *job_ids: str) -> None:
    """No secret in any column of the jobs' rows, in their events, or in the worker logs."""
    with Session(platform.history) as session:
        for job_id in job_ids:
            job = session.get(Job, job_id)
            assert job is not None
            row = {column.key: getattr(job, column.key) for column in Job.__table__.columns}
            events = session.scalars(sqlalchemy.select(JobEvent).where(JobEvent.job_id == job_id))
            text = json.dumps([row, [e.detail for e in events]], default=str)
            assert not [s for s in SECRETS if s in text], f"a secret is in the history of {job_id}"
    logs = platform.logs()
    assert logs, "the worker wrote no log"
    assert not [s for s in SECRETS if s in logs], "a secret is in the worker log"


# -- ai.generate -----------------------------------------------------------------------------------
def test_ai_generate_records_text_usage_and_progress_and_never_the_keys(
    platform: Platform, server: ScriptedServer
) -> None:
    server.routes[CHAT] = Script(then=completion())
    server.routes[f"/own{CHAT}"] = Script(then=completion("Bonjour.", 20, 5, model="own-2"))
    task = platform.task("ai.generate")

    configured = task.delay(prompt="Say hello", model="tiny-1", max_tokens=20, temperature=0).id
    chat = [{"role": "system", "content": "French"}, {"role": "user", "content": "Say hello"}]
    own_url = f"{server.url}/own/v1"
    own = task.delay(messages=chat, model="own-2", base_url=own_url, api_key=JOB_AI_KEY).id

    job = wait_state(platform, configured, "succeeded")
    assert job.result == {
        "text": "Hello there.",
        "model": "tiny-1",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
    assert (job.percent, job.progress_note) == (100.0, "done")
    assert (job.prompt_tokens, job.completion_tokens) == (9, 3)
    other = wait_state(platform, own, "succeeded")
    assert other.result["text"] == "Bonjour."
    assert (other.prompt_tokens, other.completion_tokens) == (20, 5)
    assert other.kwargs["api_key"] == "[redacted]"

    [sent] = server.received(CHAT)
    assert sent.header("Authorization") == f"Bearer {AI_KEY}"
    assert sent.json() == {"model": "tiny-1", "stream": False, "max_tokens": 20, "temperature": 0,
                           "messages": [{"role": "user", "content": "Say hello"}]}  # fmt: skip
    [sent_own] = server.received(f"/own{CHAT}")
    # a job's own server gets the job's key, never the configured one
    assert sent_own.header("Authorization") == f"Bearer {JOB_AI_KEY}"
    assert [m["role"] for m in sent_own.json()["messages"]] == ["system", "user"]
    assert_no_secrets(platform, configured, own)


def test_ai_generate_backs_off_on_503_and_honours_a_shorter_retry_after_on_429(
    platform: Platform, server: ScriptedServer
) -> None:
    path = f"/retry{CHAT}"
    server.routes[path] = Script(
        Reply(503, {"error": {"message": "overloaded"}}),
        Reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "1"}),
        then=completion(),
    )
    job_id = platform.task("ai.generate").delay(prompt="x", model="tiny-1",
                                                base_url=f"{server.url}/retry/v1").id  # fmt: skip

    job = wait_state(platform, job_id, "succeeded", timeout=60)
    requests = server.received(path)
    assert len(requests) == 3
    backoff, retry_after = gaps(requests)
    assert backoff >= BACKOFF_BASE / 2  # no Retry-After: the policy's backoff (3-6 s)
    assert 1.0 <= retry_after < BACKOFF_BASE / 2  # Retry-After: 1 replaced the backoff
    assert job.attempts == 3
    assert event_states(platform, job_id).count("retrying") == 2


def test_ai_generate_dead_letters_client_errors_and_a_missing_model_at_once(
    platform: Platform, server: ScriptedServer
) -> None:
    path = f"/bad{CHAT}"
    server.routes[path] = Script(then=Reply(400, {"error": {"message": "max_tokens too large"}}))
    task = platform.task("ai.generate")
    refused = task.delay(prompt="x", model="tiny-1", base_url=f"{server.url}/bad/v1").id
    no_model = task.delay(prompt="x").id  # neither the payload nor TASKS_AI_MODEL names one

    job = wait_state(platform, refused, "dead")
    assert job.dead_reason == "permanent_error"
    assert job.error_message.endswith("answered 400 Bad Request: max_tokens too large")
    assert len(server.received(path)) == 1  # never retried
    model_job = wait_state(platform, no_model, "dead")
    assert "TASKS_AI_MODEL" in (model_job.error_message or "")
    letters = {letter.task_id: letter for letter in platform.dead_letters().list("ai")}
    assert {refused, no_model} <= letters.keys()
    assert letters[refused].reason == "permanent_error"
    assert letters[refused].attempts == 1


# -- webhooks.deliver ------------------------------------------------------------------------------
def test_webhook_is_signed_afresh_on_each_attempt_and_waits_out_retry_after(
    platform: Platform, server: ScriptedServer
) -> None:
    def busy_for_2_seconds(_: Received) -> Reply:  # the HTTP-date form, 1 s precision
        until = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
        return Reply(503, headers={"Retry-After": until})

    server.routes["/hooks/flaky"] = Script(
        busy_for_2_seconds,
        Reply(408, headers={"Retry-After": "1"}),
        then=Reply(204),
    )
    body = {"order": 42, "status": "paid", "note": "größe"}
    job_id = platform.task("webhooks.deliver").delay(url=f"{server.url}/hooks/flaky", body=body,
                                                     event="order.paid").id  # fmt: skip

    job = wait_state(platform, job_id, "succeeded", timeout=60)
    requests = server.received("/hooks/flaky")
    assert len(requests) == 3
    until_date, after_408 = gaps(requests)
    assert 1.0 <= until_date < BACKOFF_BASE / 2  # the date was 1-2 s ahead, not the backoff
    assert 1.0 <= after_408 < BACKOFF_BASE / 2
    for request in requests:
        assert request.header(ID_HEADER) == job_id  # the same event id on every attempt
        assert request.header("Webhook-Event") == "order.paid"
        assert json.loads(request.body) == body
        timestamp, signature = request.header(TIMESTAMP_HEADER), request.header(SIGNATURE_HEADER)
        assert verify_signature(WEBHOOK_SECRET, body=request.body, timestamp=timestamp,
                                signature=signature)  # fmt: skip
        assert not verify_signature("whsec-wrong", body=request.body, timestamp=timestamp,
                                    signature=signature)  # fmt: skip
    stamps = [r.header(TIMESTAMP_HEADER) for r in requests]
    assert len(set(stamps)) == 3  # every attempt signed afresh
    assert len({r.header(SIGNATURE_HEADER) for r in requests}) == 3
    assert job.result == {"status": 204, "event_id": job_id, "timestamp": int(stamps[-1] or 0)}


def test_webhook_with_its_own_secret_and_a_rejecting_receiver_is_dead_lettered(
    platform: Platform, server: ScriptedServer
) -> None:
    server.routes["/hooks/gone"] = Script(then=Reply(410, {"error": "endpoint disabled"}))
    server.routes["/hooks/own"] = Script(then=Reply(200))
    task = platform.task("webhooks.deliver")
    gone = task.delay(url=f"{server.url}/hooks/gone", body={"n": 1}).id
    own = task.delay(url=f"{server.url}/hooks/own", body=[1, 2], secret=JOB_WEBHOOK_SECRET).id

    assert wait_state(platform, gone, "dead").dead_reason == "permanent_error"
    assert len(server.received("/hooks/gone")) == 1
    assert wait_state(platform, own, "succeeded").kwargs["secret"] == "[redacted]"
    [request] = server.received("/hooks/own")
    signed = {"body": request.body, "timestamp": request.header(TIMESTAMP_HEADER),
              "signature": request.header(SIGNATURE_HEADER)}  # fmt: skip
    assert verify_signature(JOB_WEBHOOK_SECRET, **signed)
    assert not verify_signature(WEBHOOK_SECRET, **signed)
    assert_no_secrets(platform, gone, own)


# -- payments.charge -------------------------------------------------------------------------------
def test_payment_retried_after_503_sends_the_same_idempotency_key_and_charges_once(
    platform: Platform, server: ScriptedServer
) -> None:
    provider = PaymentProvider(Reply(503, headers={"Retry-After": "1"}))
    server.routes["/pay/charges"] = provider
    task = platform.task("payments.charge")
    keyed = task.apply_async(
        kwargs={"amount": 1250, "currency": "eur", "customer": "cus_1", "description": "order 7"},
        tenant="acme", headers={"idempotency_key": "order-7"},
    ).id  # fmt: skip

    job = wait_state(platform, keyed, "succeeded", timeout=60)
    requests = server.received("/pay/charges")
    assert len(requests) == 2
    assert [r.header("Idempotency-Key") for r in requests] == ["acme:order-7", "acme:order-7"]
    assert all(r.header("Authorization") == f"Bearer {PAY_KEY}" for r in requests)
    assert list(provider.charges) == ["acme:order-7"]
    assert job.result == {"charge_id": "ch_1", "status": "succeeded", "amount": 1250,
                          "currency": "EUR", "customer": "cus_1",
                          "idempotency_key": "acme:order-7"}  # fmt: skip

    plain = task.delay(amount=300, currency="USD", customer="cus_2").id  # no key: from its id
    wait_state(platform, plain, "succeeded")
    assert list(provider.charges) == ["acme:order-7", f"tasks-platform-{plain}"]
    assert_no_secrets(platform, keyed, plain)


def test_declined_payment_is_dead_lettered_and_raises_an_alert(
    platform: Platform, server: ScriptedServer
) -> None:
    server.routes["/pay/charges"] = PaymentProvider(decline=frozenset({"cus_broke"}))
    with EventTap(platform.app, "task-alert") as alerts:
        job_id = platform.task("payments.charge").delay(amount=999, currency="GBP",
                                                        customer="cus_broke").id  # fmt: skip
        job = wait_state(platform, job_id, "dead")
        [event] = wait_for(lambda: [e for e in alerts.seen if e["uuid"] == job_id], 10,
                           what="the task-alert event")  # fmt: skip
    assert (event["job"], event["reason"], event["attempts"]) == (
        "payments.charge", "permanent_error", 1)  # fmt: skip
    assert "Your card was declined." in event["exception"]
    assert job.dead_reason == "permanent_error"
    assert "402 Payment Required: Your card was declined." in (job.error_message or "")
    [letter] = [d for d in platform.dead_letters().list("payments") if d.task_id == job_id]
    assert letter.reason == "permanent_error"
    alert = re.compile(
        rf"CRITICAL/\w+\] ALERT: payments\.charge job {job_id} dead-lettered: permanent_error"
    )
    wait_for(lambda: alert.search(platform.logs()), 10, what="the ALERT line in the worker log")


# -- a worker killed after the provider charged, before the ack ------------------------------------
@pytest.mark.parametrize("broker", ["rabbitmq", "redis"])
def test_worker_killed_after_the_charge_is_redelivered_and_charges_exactly_once(
    broker: str, tmp_path: Path
) -> None:
    """RabbitMQ redelivers when the connection drops; Redis after the visibility timeout."""
    overrides: dict[str, Any] = {"payments_api_key": PAY_KEY}
    if broker == "redis":
        overrides.update(broker_url=SHORT_VISIBILITY_REDIS_URL, visibility_timeout=6,
                         backoff_max=4, redis_restore_interval=1)  # fmt: skip
    provider = PaymentProvider(drop_first=True)
    with (
        scripted_server({"/pay/charges": provider}) as server,
        control_platform(
            broker, tmp_path, payments_base_url=f"{server.url}/pay", **overrides
        ) as platform,
    ):
        victim = platform.worker(concurrency=1, queues=["payments"])
        provider.on_charge = victim.kill  # the whole worker, before it can acknowledge
        job_id = platform.task("payments.charge").delay(amount=4200, currency="EUR",
                                                        customer="cus_9").id  # fmt: skip
        wait_for(lambda: victim.process.poll() is not None, 60, what="the worker killed")
        assert len(provider.charges) == 1  # the provider charged; nobody acknowledged the job

        platform.worker(concurrency=1, queues=["payments"])

        job = wait_state(platform, job_id, "succeeded", timeout=90)
        requests = server.received("/pay/charges")
    assert len(requests) >= 2
    assert {r.header("Idempotency-Key") for r in requests} == {f"tasks-platform-{job_id}"}
    assert len(provider.charges) == 1  # exactly one charge
    assert job.result["charge_id"] == "ch_1"
