"""JSON for the history's lines and documents: orjson's speed, the standard library's reach.

Each transition becomes a JSON line in the process that records it (on the path of every job)
and is read back, and every batch goes to PostgreSQL as one JSON document: orjson does each in
a tenth of the time. What orjson refuses (integers beyond 64 bits) goes through :mod:`json`,
as does reading text orjson rejects (``NaN``, written by the standard library's encoder).
Dates and times are written in ISO 8601, other values JSON has no type for as their ``str()``,
a float that is not finite as ``null`` (PostgreSQL's ``json`` takes no ``NaN``).
"""

from __future__ import annotations

import json
import math
from datetime import date
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> str:
    """``value`` as compact JSON text."""
    return dump_line(value)[:-1].decode()


def dump_line(value: Any) -> bytes:
    """``value`` as compact JSON, UTF-8 encoded, ending with a newline."""
    try:
        return orjson.dumps(value, default=str, option=_OPTIONS | orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, most likely
        text = json.dumps(_finite(value), default=_default, separators=(",", ":"))
        return (text + "\n").encode()


def loads(text: str | bytes) -> Any:
    """The value of JSON ``text``; ValueError if it is not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _default(value: Any) -> str:
    """What orjson writes for a value JSON has no type for."""
    return value.isoformat() if isinstance(value, date) else str(value)


def _finite(value: Any) -> Any:
    """``value`` with floats that are not finite replaced by None (what orjson does)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
