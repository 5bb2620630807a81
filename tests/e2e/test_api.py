"""The admin HTTP API over real HTTP: ``tasks-platform api`` in its own process, on Redis and a
fresh PostgreSQL schema, with a real worker running the jobs.

One deployment serves the whole module; each test uses its own tenants, labels and keys.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_server import ServedApi, make_token, run_cli, serve_api
from celery import chain
from conftest import Platform, make_platform, postgres_schema, settled, wait_for
from sqlalchemy import select, update

from tasks_platform.history import migrations
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import ApiToken, AuditEntry
from tasks_platform.workflow import start_workflow

API = "/api/v1"
ROLES = ("admin", "operator", "tenant")


@dataclass
class Deployment:
    platform: Platform
    api: ServedApi
    secrets: dict[str, str]
    token_ids: dict[str, str]
    tmp: Path

    def client(self, who: str | None) -> httpx.Client:
        return self.api.client(None if who is None else self.secrets[who])

    def audit(self, action: str, actor_of: str) -> list[AuditEntry]:
        actor = f"api:test-{actor_of}/{self.token_ids[actor_of]}"
        engine = create_history_engine(self.platform.settings)
        try:
            with session_factory(engine)() as session:
                query = select(AuditEntry).where(
                    AuditEntry.action == action, AuditEntry.actor == actor
                )
                return list(session.scalars(query.order_by(AuditEntry.id)))
        finally:
            engine.dispose()

    def record_file(self, label: str) -> Path:
        return self.tmp / f"runs-{label}.txt"

    def starts(self, label: str) -> int:
        path = self.record_file(label)
        lines = path.read_text().splitlines() if path.exists() else []
        return sum(1 for line in lines if line.split()[3] == "start")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("api")
    with postgres_schema() as url, make_platform("redis", tmp, database_url=url) as platform:
        settings = platform.settings
        migrations.upgrade(settings)
        secrets, ids = _tokens(settings)
        platform.worker(concurrency=2, queues=["default", "email", "ai"])
        with serve_api(settings, tmp / "api.log") as api:
            yield Deployment(platform, api, secrets, ids, tmp)


def _tokens(settings: Any) -> tuple[dict[str, str], dict[str, str]]:
    """admin (made with the command), operator, two tenants, an expired and a revoked one."""
    made = run_cli(settings, "token", "create", "--name", "test-admin", "--role", "admin",
                   TASKS_ACTOR="tests")  # fmt: skip
    assert made.returncode == 0, made.stderr
    secrets, ids = {"admin": made.stdout.strip()}, {}
    for who, role, tenant in (("operator", "operator", None), ("tenant", "tenant", "acme"),
                              ("globex", "tenant", "globex"), ("expired", "admin", None),
                              ("revoked", "admin", None)):  # fmt: skip
        ids[who], secrets[who] = make_token(settings, role, name=f"test-{who}", tenant=tenant)
    engine = create_history_engine(settings)
    try:
        with session_factory(engine).begin() as session:
            ids["admin"] = session.scalars(
                select(ApiToken.id).where(ApiToken.name == "test-admin")
            ).one()
            past = datetime.now(UTC) - timedelta(seconds=1)
            session.execute(
                update(ApiToken).where(ApiToken.id == ids["expired"]).values(expires_at=past)
            )
    finally:
        engine.dispose()
    revoked = run_cli(settings, "token", "revoke", ids["revoked"], TASKS_ACTOR="tests")
    assert revoked.returncode == 0, revoked.stderr
    return secrets, ids


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return dict(body["error"])


def _job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"{API}/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _wait_state(
    client: httpx.Client, job_id: str, *states: str, timeout: float = 30
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        response = client.get(f"{API}/jobs/{job_id}")
        if response.status_code == 404:  # a job queued by another process: not recorded yet
            return None
        assert response.status_code == 200, response.text
        detail = dict(response.json())
        return detail if detail["job"]["state"] in states else None

    return dict(wait_for(reached, timeout, what=f"job {job_id} in {states}"))


def _settled(
    client: httpx.Client, job_id: str, expected: list[str], timeout: float = 10
) -> dict[str, Any]:
    """The job's detail once its events are ``expected`` (or after ``timeout``)."""
    detail: dict[str, Any] = settled(
        lambda: dict(client.get(f"{API}/jobs/{job_id}").json()),
        lambda detail: [event["state"] for event in detail["events"]] == expected, timeout,
    )  # fmt: skip
    return detail


def _submit(client: httpx.Client, name: str = "demo.work", **body: Any) -> httpx.Response:
    return client.post(f"{API}/jobs", json={"name": name, **body})


# -- every endpoint, every role ----------------------------------------------------------------
ENDPOINTS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "health": ("GET", "/health", None),
    "metrics": ("GET", "/metrics", None),
    "queues": ("GET", "/queues", None),
    "pause": ("POST", "/queues/webhooks/pause", {"reason": "roles test"}),
    "resume": ("POST", "/queues/webhooks/resume", None),
    "list_jobs": ("GET", "/jobs", None),
    "show_job": ("GET", "/jobs/no-such-job", None),
    "show_workflow": ("GET", "/workflows/no-such-root", None),
    "submit": ("POST", "/jobs", {"name": "demo.work", "payload": {"label": "roles"}}),
    "cancel": ("POST", "/jobs/no-such-job/cancel", None),
    "retry": ("POST", "/jobs/no-such-job/retry", None),
    "clean": ("POST", "/clean", {"older_than_seconds": 3_000_000_000}),
    "dlq": ("GET", "/dlq", None),
    "dlq_groups": ("GET", "/dlq/groups", None),
    "dlq_show": ("GET", "/dlq/no-such-letter", None),
    "replay": ("POST", "/dlq/replay", {"task_id": "no-such-letter"}),
    "purge": ("POST", "/dlq/purge", {"task_id": "no-such-letter"}),
}
ALLOWED = {
    "admin": set(ENDPOINTS),
    "operator": {"health", "metrics", "queues", "pause", "resume", "list_jobs", "show_job"}
    | {"show_workflow"}
    | {"retry", "dlq", "dlq_groups", "dlq_show", "replay"},
    "tenant": {"list_jobs", "show_job", "show_workflow", "submit", "cancel"},
}
#: what an allowed request answers (the targets do not exist: that is a 404 past the role check)
ANSWERS = {"show_job": 404, "show_workflow": 404, "cancel": 404, "retry": 404, "dlq_show": 404,
           "replay": 404, "purge": 404, "submit": 201}  # fmt: skip


def _call(client: httpx.Client, endpoint: str) -> httpx.Response:
    method, path, body = ENDPOINTS[endpoint]
    return client.request(method, API + path, json=body)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_do_its_own_actions_and_gets_403_for_the_others(
    deployment: Deployment, role: str
) -> None:
    with deployment.client(role) as client:
        for endpoint in ENDPOINTS:
            response = _call(client, endpoint)
            if endpoint in ALLOWED[role]:
                expected = ANSWERS.get(endpoint, 200)
                assert response.status_code == expected, (endpoint, response.text)
            else:
                _error(response, 403, "forbidden")


@pytest.mark.parametrize("who", [None, "garbage", "expired", "revoked", "basic"])
def test_every_endpoint_answers_401_without_a_valid_token(
    deployment: Deployment, who: str | None
) -> None:
    headers = {
        None: {},
        "garbage": {"Authorization": "Bearer tpk_not-a-real-token"},
        "expired": {"Authorization": f"Bearer {deployment.secrets['expired']}"},
        "revoked": {"Authorization": f"Bearer {deployment.secrets['revoked']}"},
        "basic": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    }[who]
    code = "unauthorized" if who in (None, "basic") else "invalid_token"
    with deployment.api.client() as client:
        for method, path, body in ENDPOINTS.values():
            response = client.request(method, API + path, json=body, headers=headers)
            _error(response, 401, code)
            assert response.headers["www-authenticate"] == "Bearer"
    messages = {"expired": "expired", "revoked": "revoked"}
    if who in messages:
        assert messages[who] in response.json()["error"]["message"]


def test_openapi_document_and_docs_are_served(deployment: Deployment) -> None:
    with deployment.api.client() as client:
        spec = client.get("/openapi.json").json()
        docs = client.get("/docs")
    paths = set(spec["paths"])
    for method, path, _ in ENDPOINTS.values():
        template = path.replace("no-such-job", "{job_id}").replace("no-such-letter", "{task_id}")
        template = template.replace("webhooks", "{queue}").replace("no-such-root", "{root_id}")
        assert method.lower() in spec["paths"][API + template], template
    assert {f"{API}/live", f"{API}/jobs/{{job_id}}"} <= paths
    assert "token" in spec["components"]["securitySchemes"]
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


# -- jobs --------------------------------------------------------------------------------------
def test_a_submitted_job_runs_and_its_status_and_progress_can_be_followed(
    deployment: Deployment,
) -> None:
    with deployment.client("admin") as client:
        response = _submit(client, payload={"label": "follow", "duration": 0.2},
                           priority="high", tenant="initech")  # fmt: skip
        assert response.status_code == 201, response.text
        assert response.json()["created"] is True
        job_id = response.json()["id"]
        _wait_state(client, job_id, "succeeded")
        expected = ["queued", "started", "succeeded"]
        detail = _settled(client, job_id, expected)
    job = detail["job"]
    assert (job["name"], job["queue"], job["priority"], job["tenant"]) == (
        "demo.work", "default", "high", "initech"
    )  # fmt: skip
    assert job["payload"]["label"] == "follow"
    assert job["result"] == {"label": "follow", "attempt": 1}
    assert job["finished_at"] is not None
    assert [event["state"] for event in detail["events"]] == expected


def test_jobs_are_listed_with_filters_and_cursor_pages(deployment: Deployment) -> None:
    tenant = f"pager{uuid.uuid4().hex[:6]}"
    with deployment.client("admin") as client:
        ids = {_submit(client, payload={"label": f"p{n}"}, tenant=tenant).json()["id"]
               for n in range(5)}  # fmt: skip
        seen: list[str] = []
        cursor = None
        for _ in range(3):
            params: dict[str, Any] = {"tenant": tenant, "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = client.get(f"{API}/jobs", params=params).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
        assert cursor is None
        assert sorted(seen) == sorted(ids)  # every job once, none twice
        for job_id in ids:
            _wait_state(client, job_id, "succeeded")
        succeeded = client.get(f"{API}/jobs", params={"tenant": tenant, "state": "succeeded"})
        queued = client.get(f"{API}/jobs", params={"tenant": tenant, "state": "queued"})
        other_name = client.get(f"{API}/jobs", params={"tenant": tenant, "name": "reports.render"})
        bad_cursor = client.get(f"{API}/jobs", params={"cursor": "not-a-cursor"})
    assert {item["id"] for item in succeeded.json()["items"]} == ids
    assert queued.json()["items"] == []
    assert other_name.json()["items"] == []
    _error(bad_cursor, 400, "invalid_cursor")


def test_an_idempotency_key_gives_the_first_jobs_id_and_queues_nothing_more(
    deployment: Deployment,
) -> None:
    label = f"idem{uuid.uuid4().hex[:6]}"
    record = str(deployment.record_file(label))
    body = {"name": "demo.work", "payload": {"label": label, "record_to": record},
            "idempotency_key": f"order-{label}"}  # fmt: skip
    barrier = threading.Barrier(4)
    answers: list[httpx.Response] = []

    def send() -> None:
        with deployment.client("tenant") as client:
            barrier.wait()
            answers.append(client.post(f"{API}/jobs", json=body))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({answer.json()["id"] for answer in answers}) == 1, [a.text for a in answers]
    assert sorted(answer.status_code for answer in answers) == [200, 200, 200, 201]
    job_id = answers[0].json()["id"]
    with deployment.client("tenant") as client:
        _wait_state(client, job_id, "succeeded")
        again = client.post(f"{API}/jobs", json=body)
        other_type = client.post(f"{API}/jobs", json=body | {"name": "demo.send_email"})
    with deployment.client("globex") as client:  # same key, another tenant: its own job
        theirs = client.post(f"{API}/jobs", json=body | {"payload": {"label": f"{label}-g"}})
    assert (again.status_code, again.json()) == (200, {"id": job_id, "created": False})
    _error(other_type, 409, "idempotency_conflict")
    assert theirs.status_code == 201
    assert theirs.json()["id"] != job_id
    wait_for(lambda: deployment.starts(label) >= 1, 10, what="the job's run")
    assert deployment.starts(label) == 1


def test_a_workflow_is_shown_with_its_failing_step_and_only_to_its_own_tenant(
    deployment: Deployment,
) -> None:
    app = deployment.platform.app
    tally, work = app.tasks["demo.tally"], app.tasks["demo.work"]
    good = start_workflow(chain(tally.s(add=2), tally.s(add=3)), tenant="acme", app=app)
    bad = start_workflow(
        chain(tally.s(add=1), work.si(label="wf-boom", fail_permanently=True), tally.s()),
        tenant="acme",
        app=app,
    )

    def shown(client: httpx.Client, root_id: str, state: str, steps: int) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            response = client.get(f"{API}/workflows/{root_id}")
            if response.status_code == 404:  # not recorded yet
                return None
            view = dict(response.json())
            return view if (view["state"], view["step_count"]) == (state, steps) else None

        return dict(wait_for(reached, 30, what=f"workflow {root_id} {state}"))

    with deployment.client("tenant") as acme:
        done = shown(acme, good, "succeeded", 2)
        failed = shown(acme, bad, "failed", 2)
    assert [(s["name"], s["result"], s["tenant"]) for s in done["steps"]] == [
        ("demo.tally", 2, "acme"),
        ("demo.tally", 5, "acme"),
    ]
    assert done["failing"] == []
    assert [(f["name"], f["id"], f["error_type"]) for f in failed["failing"]] == [
        ("demo.work", failed["steps"][1]["id"], "SimulatedRejection")
    ]
    with deployment.client("globex") as globex:
        _error(globex.get(f"{API}/workflows/{good}"), 404, "workflow_not_found")
    with deployment.client("admin") as admin:
        assert admin.get(f"{API}/workflows/{good}").json()["state"] == "succeeded"
        _error(admin.get(f"{API}/workflows/no-such-root"), 404, "workflow_not_found")


def test_a_tenant_never_sees_nor_touches_another_tenants_jobs(deployment: Deployment) -> None:
    with deployment.client("tenant") as acme:
        mine = _submit(acme, payload={"label": "acme-job"}, idempotency_key="shared-key")
        assert mine.status_code == 201
        job_id = mine.json()["id"]
        assert _job(acme, job_id)["job"]["tenant"] == "acme"
        forced = _submit(acme, payload={"label": "acme-2"})
        assert _job(acme, forced.json()["id"])["job"]["tenant"] == "acme"
        other = _submit(acme, payload={"label": "x"}, tenant="globex")
        _error(other, 403, "forbidden")
    with deployment.client("globex") as globex:
        missing = globex.get(f"{API}/jobs/{uuid.uuid4()}")
        theirs = globex.get(f"{API}/jobs/{job_id}")
        cancel = globex.post(f"{API}/jobs/{job_id}/cancel")
        listed = globex.get(f"{API}/jobs", params={"limit": 1000}).json()["items"]
        by_name = globex.get(f"{API}/jobs", params={"tenant": "acme"}).json()["items"]
        same_key = _submit(globex, payload={"label": "globex-job"}, idempotency_key="shared-key")
    assert _error(theirs, 404, "job_not_found")["message"].replace(job_id, "ID") == _error(
        missing, 404, "job_not_found"
    )["message"].replace(missing.url.path.rsplit("/", 1)[1], "ID")
    _error(cancel, 404, "job_not_found")
    assert job_id not in {item["id"] for item in listed}
    assert all(item["tenant"] == "globex" for item in listed)
    assert by_name == []
    assert same_key.status_code == 201
    assert same_key.json()["id"] != job_id


def test_cancel_and_retry_act_through_control_and_are_audited(deployment: Deployment) -> None:
    label = f"cancel{uuid.uuid4().hex[:6]}"
    with deployment.client("tenant") as tenant:
        # payments has no worker in this deployment: the job waits in its queue
        queued = _submit(tenant, "demo.charge_card", payload={"label": label}).json()["id"]
        cancelled = tenant.post(f"{API}/jobs/{queued}/cancel", json={"reason": "changed mind"})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"id": queued, "outcome": "cancelled"}
    assert [e.target for e in deployment.audit("job.cancel", "tenant")][-1:] == [f"job:{queued}"]

    dead_label = f"retry{uuid.uuid4().hex[:6]}"
    record = str(deployment.record_file(dead_label))
    with deployment.client("admin") as admin:
        payload = {"label": dead_label, "fail_permanently": True, "record_to": record}
        failed = _submit(admin, payload=payload).json()["id"]
        _wait_state(admin, failed, "dead")
    with deployment.client("operator") as operator:
        retried = operator.post(f"{API}/jobs/{failed}/retry", json={"reason": "fixed upstream"})
        assert retried.status_code == 201, retried.text
        new_id = retried.json()["new_id"]
        assert new_id != failed
        wait_for(lambda: deployment.starts(dead_label) == 2, 30, what="the retried job's run")
        detail = _wait_state(operator, new_id, "dead", "failed")
    assert detail["job"]["retry_of"] == failed
    assert [e.target for e in deployment.audit("job.retry", "operator")][-1:] == [f"job:{failed}"]


def test_queues_are_listed_paused_and_resumed(deployment: Deployment) -> None:
    with deployment.client("operator") as operator:
        paused = operator.post(f"{API}/queues/reports/pause", json={"reason": "maintenance"})
        listing = operator.get(f"{API}/queues").json()
        resumed = operator.post(f"{API}/queues/reports/resume")
        after = operator.get(f"{API}/queues").json()
        unknown = operator.post(f"{API}/queues/nope/pause")
    assert paused.json() == {"queue": "reports", "paused": True}
    queues = {queue["name"]: queue for queue in listing["queues"]}
    assert set(queues) == {"ai", "email", "reports", "webhooks", "payments", "default"}
    assert queues["reports"]["paused"] is True
    assert queues["reports"]["pause_reason"] == "maintenance"
    assert queues["default"]["consumers"]
    assert queues["payments"]["consumers"] == []
    assert set(queues["default"]["by_priority"]) == {"critical", "high", "normal", "low"}
    assert listing["workers"]
    assert resumed.json() == {"queue": "reports", "paused": False}
    assert {q["name"]: q["paused"] for q in after["queues"]}["reports"] is False
    _error(unknown, 404, "queue_not_found")
    assert "queue:reports" in [e.target for e in deployment.audit("queue.pause", "operator")]
    assert "queue:reports" in [e.target for e in deployment.audit("queue.resume", "operator")]


def test_health_and_prometheus_metrics(deployment: Deployment) -> None:
    with deployment.client("operator") as client:
        health = client.get(f"{API}/health", params={"window_seconds": 600})
        metrics = client.get(f"{API}/metrics")
        bad_window = client.get(f"{API}/health", params={"window_seconds": 0})
    assert health.status_code == 200
    assert health.json()["level"] in ("healthy", "warning", "critical")
    assert isinstance(health.json()["alerts"], list)
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'tasks_queue_depth{queue="default",priority="normal"}' in metrics.text
    assert "tasks_source_up" in metrics.text
    _error(bad_window, 422, "invalid_request")


def test_clean_removes_old_history_and_is_admin_only(deployment: Deployment) -> None:
    with deployment.client("admin") as admin:
        cleaned = admin.post(f"{API}/clean", json={"older_than_seconds": 30 * 86_400})
        invalid = admin.post(f"{API}/clean", json={"older_than_seconds": 0})
    with deployment.client("operator") as operator:
        refused = operator.post(f"{API}/clean", json={"older_than_seconds": 30 * 86_400})
    assert cleaned.status_code == 200, cleaned.text
    assert cleaned.json()["deleted"] >= 0
    _error(invalid, 422, "invalid_request")
    _error(refused, 403, "forbidden")
    assert (
        deployment.audit("history.clean", "admin")[-1].detail["jobs_deleted"]
        == cleaned.json()["deleted"]
    )


# -- dead letters ------------------------------------------------------------------------------
def test_dead_letters_are_listed_grouped_replayed_by_group_and_purged(
    deployment: Deployment,
) -> None:
    tag = uuid.uuid4().hex[:4]
    # the digits differ, the fingerprint does not: grp-11 and grp-22 are one group
    labels = {"a": f"grp{tag}-11", "b": f"grp{tag}-22", "other": f"odd{tag}"}
    with deployment.client("admin") as admin:
        ids = {}
        for key, label in labels.items():
            name = "demo.send_email" if key == "other" else "demo.work"
            payload = {"label": label, "fail_permanently": True,
                       "record_to": str(deployment.record_file(label))}  # fmt: skip
            ids[key] = _submit(admin, name, payload=payload).json()["id"]
        for job_id in ids.values():
            _wait_state(admin, job_id, "dead")
    with deployment.client("operator") as operator:
        letters = operator.get(f"{API}/dlq", params={"limit": 1000}).json()
        shown = operator.get(f"{API}/dlq/{ids['a']}").json()
        groups = operator.get(f"{API}/dlq/groups").json()
        group = next(g for g in groups if ids["a"] in g["task_ids"])
        assert sorted(group["task_ids"]) == sorted([ids["a"], ids["b"]])
        replay = operator.post(f"{API}/dlq/replay", json={"group": group["fingerprint"],
                                                          "reason": "upstream fixed"})  # fmt: skip
        purge_refused = operator.post(f"{API}/dlq/purge", json={"group": group["fingerprint"]})
    assert {ids["a"], ids["b"], ids["other"]} <= {letter["task_id"] for letter in letters}
    assert shown["task_id"] == ids["a"]
    assert shown["reason"] == "permanent_error"
    assert shown["payload"]
    assert replay.status_code == 200, replay.text
    assert sorted(replay.json()["replayed"]) == sorted([ids["a"], ids["b"]])
    _error(purge_refused, 403, "forbidden")
    wait_for(lambda: deployment.starts(labels["a"]) == 2 and deployment.starts(labels["b"]) == 2,
             30, what="the group's jobs to run again")  # fmt: skip
    assert deployment.starts(labels["other"]) == 1
    audit = deployment.audit("dlq.replay", "operator")[-1]
    assert audit.reason == "upstream fixed"
    assert sorted(audit.detail["task_ids"]) == sorted([ids["a"], ids["b"]])

    with deployment.client("admin") as admin:
        for key in ("a", "b"):  # dead again: the replay ran the same failing payload
            wait_for(lambda k=key: admin.get(f"{API}/dlq/{ids[k]}").status_code == 200, 30,
                     what="the replayed job back in its dead-letter queue")  # fmt: skip
        purged = admin.post(f"{API}/dlq/purge", json={"task_id": ids["other"], "reason": "noise"})
        gone = admin.get(f"{API}/dlq/{ids['other']}")
        empty = admin.post(f"{API}/dlq/replay", json={"queue": "nope"})
        neither = admin.post(f"{API}/dlq/replay", json={"reason": "which?"})
    assert purged.json() == {"purged": 1}
    _error(gone, 404, "dead_letter_not_found")
    _error(empty, 404, "queue_not_found")
    _error(neither, 422, "invalid_request")
    assert deployment.audit("dlq.purge", "admin")[-1].reason == "noise"


# -- bad input ---------------------------------------------------------------------------------
BAD_BODIES: list[tuple[str, bytes, str, int, str]] = [
    ("not json", b"{'name': ", "application/json", 422, "malformed_body"),
    ("a list", b"[]", "application/json", 422, "invalid_request"),
    ("no content type", b'{"name": "demo.work"}', "text/plain", 422, "invalid_request"),
    ("missing name", b"{}", "application/json", 422, "invalid_request"),
    ("unknown field", b'{"name": "demo.work", "colour": 1}', "application/json", 422,
     "invalid_request"),
    ("bad priority", b'{"name": "demo.work", "priority": "urgent"}', "application/json", 422,
     "invalid_request"),
    ("bad tenant", b'{"name": "demo.work", "tenant": "a b"}', "application/json", 422,
     "invalid_request"),
    ("empty key", b'{"name": "demo.work", "idempotency_key": ""}', "application/json", 422,
     "invalid_request"),
    ("payload not an object", b'{"name": "demo.work", "payload": [1]}', "application/json", 422,
     "invalid_request"),
    ("payload off schema", b'{"name": "demo.work", "payload": {"duration": -1}}',
     "application/json", 422, "invalid_payload"),
    ("unknown job", b'{"name": "no.such_job"}', "application/json", 422, "unknown_job"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "content_type", "status", "code"), BAD_BODIES,
                         ids=[case[0] for case in BAD_BODIES])  # fmt: skip
def test_malformed_submissions_are_refused_with_a_clear_4xx(
    deployment: Deployment, case: str, body: bytes, content_type: str, status: int, code: str
) -> None:
    with deployment.client("admin") as client:
        response = client.post(f"{API}/jobs", content=body, headers={"content-type": content_type})
    _error(response, status, code)


def test_malformed_queries_and_paths_are_refused_with_422(deployment: Deployment) -> None:
    with deployment.client("admin") as client:
        for params in ({"limit": 0}, {"limit": "many"}, {"state": "sleeping"},
                       {"since": "yesterday"}):  # fmt: skip
            _error(client.get(f"{API}/jobs", params=params), 422, "invalid_request")
        _error(client.get(f"{API}/jobs/{'x' * 65}"), 422, "invalid_request")
        _error(client.get(f"{API}/nothing-here"), 404, "not_found")
        _error(client.delete(f"{API}/jobs"), 405, "method_not_allowed")


def test_oversized_bodies_are_refused_with_413_and_oversized_payloads_with_422(
    deployment: Deployment,
) -> None:
    limit = deployment.platform.settings.api_max_body_bytes
    huge = b'{"name": "demo.work", "payload": {"label": "' + b"x" * limit + b'"}}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(huge), 65_536):
            yield huge[start : start + 65_536]

    rows = [["y" * 1000] for _ in range(1200)]  # about 1.2 MB: over the payload limit only
    with deployment.client("admin") as client:
        declared = client.post(f"{API}/jobs", content=huge,
                               headers={"content-type": "application/json"})  # fmt: skip
        chunked = client.post(f"{API}/jobs", content=chunks(),
                              headers={"content-type": "application/json"})  # fmt: skip
        payload = _submit(client, "reports.render",
                          payload={"title": "big", "columns": ["c"], "rows": rows})  # fmt: skip
        alive = client.get(f"{API}/jobs", params={"limit": 1})
    _error(declared, 413, "payload_too_large")
    _error(chunked, 413, "payload_too_large")
    assert "TASKS_MAX_PAYLOAD_BYTES" in _error(payload, 422, "invalid_payload")["message"]
    assert alive.status_code == 200


def test_token_commands_list_and_never_show_secrets(deployment: Deployment) -> None:
    settings = deployment.platform.settings
    listed = run_cli(settings, "token", "list")
    as_json = run_cli(settings, "token", "list", "--json")
    no_tenant = run_cli(settings, "token", "create", "--name", "x", "--role", "tenant")
    unknown = run_cli(settings, "token", "revoke", "tk_nope")
    assert listed.returncode == 0, listed.stderr
    for who in ("admin", "operator", "tenant", "revoked", "expired"):
        assert deployment.token_ids[who] in listed.stdout
        assert deployment.secrets[who] not in listed.stdout + as_json.stdout
    statuses = {line.split()[0]: line for line in listed.stdout.splitlines() if line}
    assert "revoked" in statuses[deployment.token_ids["revoked"]]
    assert "expired" in statuses[deployment.token_ids["expired"]]
    assert "acme" in statuses[deployment.token_ids["tenant"]]
    assert no_tenant.returncode == 2
    assert "tenant" in no_tenant.stderr
    assert unknown.returncode == 2
    assert "tk_nope" in unknown.stderr


def test_the_api_drives_a_rabbitmq_deployment_too(tmp_path: Path) -> None:
    """Submit (priority, tenant, key), run, dead-letter and replay on RabbitMQ."""
    with (
        postgres_schema() as url,
        make_platform("rabbitmq", tmp_path, database_url=url) as platform,
    ):
        migrations.upgrade(platform.settings)
        _, secret = make_token(platform.settings, "admin")
        platform.worker(concurrency=1, queues=["default"])
        record = str(tmp_path / "runs.txt")
        with (
            serve_api(platform.settings, tmp_path / "api.log") as api,
            api.client(secret) as client,
        ):
            body = {"payload": {"label": "rmq", "record_to": record}, "priority": "critical",
                    "tenant": "acme", "idempotency_key": "rmq-1"}  # fmt: skip
            first, again = _submit(client, **body), _submit(client, **body)
            job = _wait_state(client, first.json()["id"], "succeeded")["job"]
            doomed = _submit(client, payload={"label": "rmq-dead", "fail_permanently": True})
            dead_id = doomed.json()["id"]
            _wait_state(client, dead_id, "dead")
            letter = client.get(f"{API}/dlq/{dead_id}")
            replayed = client.post(f"{API}/dlq/replay", json={"task_id": dead_id})
            queues = {q["name"]: q for q in client.get(f"{API}/queues").json()["queues"]}
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert (job["priority"], job["tenant"], job["idempotency_key"]) == ("critical", "acme", "rmq-1")
    assert letter.json()["reason"] == "permanent_error"
    assert replayed.json()["replayed"] == [dead_id]
    assert queues["default"]["by_priority"] == {"all": queues["default"]["depth"]}
    assert len(Path(record).read_text().splitlines()) == 2  # one start, one done: ran once
