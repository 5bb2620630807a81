"""The ``demo`` family: scripted jobs for the demo and tests, one per work queue.

Each job sleeps, fails transiently ``fail_times`` times, fails permanently or kills its own
process, as its payload says; ``demo.work`` runs on ``default``, the others stand in for the
families whose real job types come later (``ai``, ``email``, ``webhooks``, ``payments``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tasks_platform.domain.simulation import Script, SimulatedOutage, perform
from tasks_platform.jobs.declaration import JobContext, job
from tasks_platform.jobs.retry import RetryPolicy

RETRY = RetryPolicy(max_retries=3, backoff_base=0.5, backoff_max=4.0, transient=(SimulatedOutage,))


class Simulation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(default="", max_length=200)
    duration: float = Field(default=0.0, ge=0, le=600)
    fail_times: int = Field(default=0, ge=0, le=100)
    fail_permanently: bool = False
    crash: bool = False
    record_to: str | None = None
    progress_steps: int = Field(default=0, ge=0, le=1000)
    usage: dict[str, int] | None = Field(
        default=None, description="Token counts the result reports as its 'usage'."
    )
    effects_to: str | None = Field(
        default=None,
        description="Folder where a successful run applies its effect once per idempotency key.",
    )


def _run(context: JobContext, payload: Simulation) -> dict[str, object]:
    script = Script(**payload.model_dump())
    # a long simulated call stops soon after an operator cancels it; the effect is applied once
    # per idempotency key (else per job id: every delivery of one job has the same id)
    return perform(script, attempt=context.attempt, checkpoint=context.raise_if_cancelled,
                   progress=context.report_progress,
                   effect_key=context.idempotency_key or context.id)  # fmt: skip


class AccountSync(BaseModel):
    """A payload with credentials in it: they must never reach the history."""

    model_config = ConfigDict(extra="forbid")

    account: str
    password: str
    api_key: str
    phone: str | None = None
    options: dict[str, str] = Field(default_factory=dict)


@job("demo.sync_account", queue="default", schema=AccountSync, sensitive=("phone",))
def sync_account(payload: AccountSync) -> dict[str, object]:
    """Stands in for a call to a partner API that takes credentials and returns a token."""
    return {"account": payload.account, "session_token": f"tok-{payload.account}-issued"}


class Tally(BaseModel):
    """A workflow step: adds ``add`` to what the steps before it gave."""

    model_config = ConfigDict(extra="forbid")

    add: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    #: the previous step's result (in a chord's callback, the list of the group's results)
    previous: int | list[int] | None = None


@job("demo.tally", queue="default", schema=Tally, parent_result="previous")
def tally(payload: Tally) -> int:
    """Sums the previous result(s) and ``add``: a chain or a fan-in of these is checkable."""
    previous = payload.previous
    total = sum(previous) if isinstance(previous, list) else (previous or 0)
    return total + payload.add


@job("demo.noop", queue="default")
def noop() -> None:
    """Does nothing: what the benchmarks measure is the platform around a job."""


@job("demo.work", queue="default", schema=Simulation, retry=RETRY, bind=True)
def work(context: JobContext, payload: Simulation) -> dict[str, object]:
    """A scripted job on the default queue."""
    return _run(context, payload)


@job("demo.generate_text", queue="ai", schema=Simulation, retry=RETRY, bind=True)
def generate_text(context: JobContext, payload: Simulation) -> dict[str, object]:
    """Stands in for an LLM call: slow, sometimes rate limited."""
    return _run(context, payload)


@job("demo.send_email", queue="email", schema=Simulation, retry=RETRY, bind=True)
def send_email(context: JobContext, payload: Simulation) -> dict[str, object]:
    """Stands in for an SMTP send."""
    return _run(context, payload)


@job("demo.deliver_webhook", queue="webhooks", schema=Simulation, retry=RETRY, bind=True)
def deliver_webhook(context: JobContext, payload: Simulation) -> dict[str, object]:
    """Stands in for a webhook POST."""
    return _run(context, payload)


@job("demo.charge_card", queue="payments", schema=Simulation, retry=RETRY, bind=True)
def charge_card(context: JobContext, payload: Simulation) -> dict[str, object]:
    """Stands in for a payment provider call."""
    return _run(context, payload)
