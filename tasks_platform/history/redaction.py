"""Keeping secrets out of the history: redaction of payloads and bounding of results."""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from tasks_platform.history.encoding import dumps, loads

REDACTED = "[redacted]"
#: keys whose values never reach the history, whatever the job type
SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[_-]?key|authori[sz]ation|credentials?"
    r"|private[_-]?key|access[_-]?key|cookie|session[_-]?id",
    re.IGNORECASE,
)
#: keys that look secret but are counts (LLM token usage and limits: ``max_tokens`` ...)
NOT_SECRET_KEY = re.compile(
    r"(max|prompt|completion|total|input|output|reasoning|cached)_tokens", re.IGNORECASE
)
_MAX_DEPTH = 20
#: values that hold no key, so nothing to redact or bound
_PLAIN = (str, int, float, bool)


def redact(value: Any, sensitive: Collection[str] = (), *, _depth: int = 0) -> Any:
    """A copy of ``value`` with the values of secret-looking or ``sensitive`` keys replaced."""
    if _depth > _MAX_DEPTH:
        return "[too deep]"
    if value is None or isinstance(value, _PLAIN):  # nothing to hide in it
        return value
    if not value:  # an empty payload: the common case
        return [] if isinstance(value, list | tuple) else {} if isinstance(value, dict) else value
    if isinstance(value, dict):
        lowered = {name.lower() for name in sensitive}
        return {
            key: REDACTED
            if isinstance(key, str) and (_secret_looking(key) or key.lower() in lowered)
            else redact(item, sensitive, _depth=_depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item, sensitive, _depth=_depth + 1) for item in value]
    return value


def _secret_looking(key: str) -> bool:
    return bool(SECRET_KEY.search(key)) and not NOT_SECRET_KEY.fullmatch(key)


def bounded(value: Any, limit: int) -> Any:
    """``value`` if its JSON is at most ``limit`` bytes, else a preview that says so."""
    if value is None or (isinstance(value, int | float) and math.isfinite(value)):
        return value  # a few bytes at most, and JSON as it is
    try:
        text = dumps(value)
    except (TypeError, ValueError):  # a value that holds itself
        text = dumps(repr(value))
    if len(text) <= limit:
        return loads(text)
    return {"truncated": True, "bytes": len(text), "preview": text[: max(limit // 4, 64)]}


def bounded_text(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 20] + "\n... (truncated)"
