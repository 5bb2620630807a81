"""The ``ai`` family: ``ai.generate`` asks an OpenAI-compatible chat completions API.

The result is ``{"text", "model", "finish_reason", "usage": {"prompt_tokens",
"completion_tokens", "total_tokens"}}``; the history keeps the token counts per job.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks_platform.domain.ai import complete
from tasks_platform.domain.http import check_http_url
from tasks_platform.errors import PermanentError
from tasks_platform.jobs.declaration import JobContext, job
from tasks_platform.jobs.retry import RetryPolicy

#: the soft time limit; a request may take until a few seconds before it (TASKS_AI_TIMEOUT)
SOFT_TIME_LIMIT = 300.0
TIME_LIMIT = 330.0
_MARGIN = 10.0


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class Generate(BaseModel):
    """``messages`` (or a single user ``prompt``), and how to generate."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    #: another OpenAI-compatible server for this job (TASKS_AI_API_KEY is never sent there)
    base_url: str | None = None
    #: the key for ``base_url`` (kept out of the history and of monitors)
    api_key: str | None = Field(default=None, min_length=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @model_validator(mode="after")
    def _one_input(self) -> Generate:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' and 'prompt'")
        return self

    def chat(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [{"role": m.role, "content": m.content} for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]


@job(
    "ai.generate",
    queue="ai",
    schema=Generate,
    retry=RetryPolicy(max_retries=5),
    soft_time_limit=SOFT_TIME_LIMIT,
    time_limit=TIME_LIMIT,
    bind=True,
    sensitive=("api_key",),
)
def generate(context: JobContext, payload: Generate) -> dict[str, object]:
    """Generate text; 429/5xx/timeouts are retried (honouring Retry-After), other 4xx are not."""
    settings = context.settings
    model = payload.model or settings.ai_model
    if not model:
        raise PermanentError(
            "ai.generate has no model: give 'model' in the payload or set TASKS_AI_MODEL"
        )
    if payload.base_url is not None:  # the configured key only ever goes to the configured URL
        base_url, api_key = payload.base_url, payload.api_key
    else:
        base_url = settings.ai_base_url
        configured = settings.ai_api_key
        api_key = payload.api_key or (configured.get_secret_value() if configured else None)
    context.report_progress(10, f"calling {model}")
    completion = complete(
        base_url=base_url,
        model=model,
        messages=payload.chat(),
        api_key=api_key,
        timeout=min(settings.ai_timeout, SOFT_TIME_LIMIT - _MARGIN),
        temperature=payload.temperature,
        max_tokens=payload.max_tokens,
    )
    context.report_progress(100, "done")
    return completion.as_result()
