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


def _run(context: JobContext, payload: Simulation) -> dict[str, object]:
    script = Script(**payload.model_dump())
    return perform(script, attempt=context.attempt)


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
