"""Request and response bodies of the admin API (they make its OpenAPI document).

Requests refuse unknown fields, so that a misspelt option is an error rather than ignored.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks_platform.topology import Priority

TENANT = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$"
#: a payload key or idempotency key: printable, no control characters
KEY = r"^[\x21-\x7e]{1,255}$"
REASON_MAX = 2000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="What went wrong, for a person.")
    details: list[dict[str, Any]] | None = Field(
        default=None, description="Request validation errors: where and what."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- jobs --------------------------------------------------------------------------------------
class SubmitRequest(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "demo.work",
                    "payload": {"label": "example", "duration": 0.1},
                    "priority": "high",
                    "tenant": "acme",
                    "idempotency_key": "order-1234",
                }
            ]
        },
    )

    name: str = Field(min_length=1, max_length=200, description="The job type, e.g. demo.work.")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="Validated against the job type's schema."
    )
    priority: Priority | None = Field(default=None, description="Default: the job type's.")
    tenant: str | None = Field(
        default=None,
        pattern=TENANT,
        description="Whose job this is. A tenant token always submits for its own tenant.",
    )
    idempotency_key: str | None = Field(
        default=None,
        pattern=KEY,
        description="Submitting the same key again (same tenant) returns the first job's id "
        "and queues nothing.",
    )


class SubmitResponse(BaseModel):
    id: str
    created: bool = Field(description="False when the idempotency key named an earlier job.")


class ActionRequest(Strict):
    reason: str | None = Field(default=None, max_length=REASON_MAX, description="For the audit.")


class Job(BaseModel):
    """One job as the history knows it."""

    id: str
    name: str | None
    queue: str | None
    priority: str | None
    tenant: str | None
    state: str
    attempts: int
    max_retries: int | None
    args: list[Any] | None
    payload: dict[str, Any] | None = Field(description="The payload, secrets redacted.")
    result: Any = None
    error_type: str | None
    error_message: str | None
    error_traceback: str | None
    dead_reason: str | None
    worker: str | None
    parent_id: str | None
    root_id: str | None
    group_id: str | None
    idempotency_key: str | None
    retry_of: str | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    wait_seconds: float | None
    run_seconds: float | None
    percent: float | None = Field(
        default=None, description="How far the running attempt says it is (0-100), if it says."
    )
    progress_note: str | None = Field(
        default=None, description="What the job said with its latest progress report."
    )
    run_seconds_total: float | None = Field(
        default=None, description="Run time of all its attempts together."
    )
    prompt_tokens: int | None = Field(default=None, description="LLM tokens of its prompt.")
    completion_tokens: int | None = Field(default=None, description="LLM tokens it generated.")
    updated_at: datetime


class JobEvent(BaseModel):
    """One transition of a job."""

    state: str
    attempt: int
    at: datetime
    worker: str | None
    detail: dict[str, Any] | None


class JobDetail(BaseModel):
    job: Job
    events: list[JobEvent] = Field(description="Every transition, in order: its progress.")


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last.")


class FailingStep(BaseModel):
    """A step that failed its workflow: its job type, id, state and error."""

    id: str
    name: str | None
    state: str
    error_type: str | None
    error_message: str | None


class Workflow(BaseModel):
    """A workflow (chain, group, chord): every job recorded under one root id."""

    root_id: str
    state: str = Field(description="running, succeeded, or failed (a step failed or stopped).")
    step_count: int = Field(description="How many steps the history has of it.")
    truncated: bool = Field(description="True when `steps` holds only the first 1000.")
    failing: list[FailingStep] = Field(description="The steps that failed it, with their error.")
    steps: list[Job] = Field(description="Its steps in the order they were queued.")


class CancelResponse(BaseModel):
    id: str
    outcome: str = Field(description="cancelled (will never run) or terminating (was running).")


class RetryResponse(BaseModel):
    id: str
    new_id: str = Field(description="The id of the new job (its retry_of is `id`).")


# -- queues, health, clean ---------------------------------------------------------------------
class Queue(BaseModel):
    name: str
    depth: int | None = Field(
        description="Messages waiting, all priorities together (null: broker unreadable)."
    )
    by_priority: dict[str, int]
    consumers: list[str]
    dead_letters: int | None
    paused: bool
    paused_at: datetime | None = None
    paused_by: str | None = None
    pause_reason: str | None = None


class QueuesResponse(BaseModel):
    queues: list[Queue]
    workers: list[str]
    window: dict[str, Any] | None = Field(description="Job figures of the recent window.")
    unavailable: dict[str, str] = Field(description="Sources that could not be read, and why.")


class PauseResponse(BaseModel):
    queue: str
    paused: bool


class Health(BaseModel):
    level: str = Field(description="healthy, warning or critical.")
    alerts: list[dict[str, Any]]


class Live(BaseModel):
    status: str


class CleanRequest(Strict):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"older_than_seconds": 2_592_000}]}
    )

    older_than_seconds: int = Field(
        ge=1, le=100 * 366 * 86_400, description="Delete jobs that ended longer ago than this."
    )


class CleanResponse(BaseModel):
    deleted: int


# -- dead letters ------------------------------------------------------------------------------
class DeadLetter(BaseModel):
    task_id: str | None
    job: str | None
    queue: str
    reason: str
    exception_type: str
    exception_message: str
    fingerprint: str | None = None
    traceback: str
    attempts: int
    dead_at: float | None
    content_type: str | None
    payload: Any


class DeadLetterGroup(BaseModel):
    fingerprint: str
    name: str | None
    exc_type: str
    message: str
    example: str | None = None
    queues: list[str]
    count: int
    task_ids: list[str]
    first_at: float | None
    last_at: float | None


class DeadLetterSelection(Strict):
    """Which dead letters: one task id, a queue, a fingerprint group, or all of them."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"queue": "email", "reason": "the SMTP relay is back"}]},
    )

    task_id: str | None = Field(default=None, min_length=1, max_length=255)
    queue: str | None = Field(default=None, min_length=1, max_length=200)
    group: str | None = Field(default=None, min_length=1, max_length=64)
    all: bool = Field(default=False, description="Every dead letter (nothing else may be given).")
    reason: str | None = Field(default=None, max_length=REASON_MAX, description="For the audit.")

    @model_validator(mode="after")
    def _one_target(self) -> DeadLetterSelection:
        narrowed = any(v is not None for v in (self.task_id, self.queue, self.group))
        if self.all == narrowed:
            raise ValueError("give `all: true`, or one or more of task_id, queue, group")
        return self


class ReplayResponse(BaseModel):
    replayed: list[str] = Field(description="Task ids sent back to their work queue.")
    count: int


class PurgeResponse(BaseModel):
    purged: int = Field(description="Messages deleted for good.")


# -- usage -------------------------------------------------------------------------------------
class UsageRow(BaseModel):
    """What one tenant's jobs of one type used on one UTC day (jobs count the day they ended)."""

    day: date
    tenant: str | None
    job: str = Field(description="The job type.")
    jobs: int = Field(description="Jobs that ended that day.")
    succeeded: int
    failed: int = Field(description="Failed for good (dead-lettered).")
    cancelled: int = Field(description="Cancelled, revoked or expired.")
    attempts: int = Field(description="Attempts of those jobs, retries included.")
    run_seconds: float = Field(description="Run time of all their attempts.")
    prompt_tokens: int
    completion_tokens: int


class UsageResponse(BaseModel):
    since: date = Field(description="First UTC day, included.")
    until: date = Field(description="Last UTC day, included.")
    rows: list[UsageRow]
