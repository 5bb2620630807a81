"""Text generation through an OpenAI-compatible chat completions API.

``POST {base_url}/chat/completions`` speaks the dialect OpenAI defined and Ollama
(``http://localhost:11434/v1``), vLLM, DeepSeek and most gateways follow. Failures map to job
errors as :mod:`tasks_platform.domain.http` says: 429, 5xx and timeouts are worth retrying
(honouring ``Retry-After``), any other 4xx (bad request, wrong key, unknown model) is not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from tasks_platform.domain.http import describe_url, json_object, post_json
from tasks_platform.errors import PermanentError


@dataclass(frozen=True)
class Completion:
    """What the model answered, and what it cost in tokens."""

    text: str
    model: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def as_result(self) -> dict[str, Any]:
        """The job result: ``{"text", "model", "finish_reason", "usage": {...}}``."""
        return {
            "text": self.text,
            "model": self.model,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
            },
        }


def complete(
    *,
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    api_key: str | None,
    timeout: float,
    temperature: float | None = None,
    max_tokens: int | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Completion:
    """Ask ``model`` to continue ``messages``; TransientError/PermanentError on failure.

    ``api_key``, when given, is sent as ``Authorization: Bearer``; local servers need none.
    """
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": False}
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    headers = {"Accept": "application/json"}
    secrets = [api_key] if api_key else []
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = f"{base_url.rstrip('/')}/chat/completions"
    response = post_json(
        url,
        content=json.dumps(body).encode(),
        headers=headers,
        timeout=timeout,
        secrets=secrets,
        transport=transport,
    )
    return parse_completion(json_object(response, secrets=secrets), model=model, url=url)


def parse_completion(body: dict[str, Any], *, model: str, url: str = "") -> Completion:
    """The :class:`Completion` in a chat completions response body."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise PermanentError(f"POST {describe_url(url) if url else url} answered without choices")
    choice = choices[0]
    message = _mapping(choice.get("message"))
    content = message.get("content")
    finish = choice.get("finish_reason")
    usage = _mapping(body.get("usage"))
    prompt_tokens = _count(usage.get("prompt_tokens"))
    completion_tokens = _count(usage.get("completion_tokens"))
    total = usage.get("total_tokens")
    return Completion(
        text=content if isinstance(content, str) else "",
        model=str(body.get("model") or model),
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=_count(total) if total is not None else prompt_tokens + completion_tokens,
    )


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int:
    """A token count: a non-negative int (servers that report none count as 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return int(value)
