"""Error fingerprints: which failures are "the same error".

Two failures share a fingerprint when they come from the same job type, raised the same
exception type, and their messages are equal once the parts that vary from one job to the next
are replaced by placeholders::

    timeout after 3.2s on order 1234     -> timeout after <n>s on order <n>
    timeout after 5.1s on order 99       -> timeout after <n>s on order <n>

Replaced, in this order (earlier rules see the text before later ones rewrite it):

    <url>    scheme://...                   <email>  someone@example.org
    <str>    '...' and "..." on one line    <time>   ISO 8601 dates and times, hh:mm:ss
    <uuid>   8-4-4-4-12 hex                 <hex>    0x..., and hex runs of 6+ with a digit
    <id>     words of 8+ letters and digits mixed (tk_3f9a2c, ord_2024x, ULIDs ...)
    <n>      every other number, decimals included (3.2, 1234, v1.2.3 -> v<n>)

Whitespace runs become one space and the result is bounded, so that a message embedding a
whole payload still groups. The fingerprint is a short, stable hash: the same inputs give the
same fingerprint in every process and release that keeps these rules.
"""

from __future__ import annotations

import hashlib
import re

#: longest normalised message kept (and hashed)
MESSAGE_LIMIT = 500
#: hex digits of a fingerprint
FINGERPRINT_LENGTH = 12

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s'\"<>]*[^\s'\"<>.,;:!?)\]]", re.IGNORECASE), "<url>"),
    (re.compile(r"\b[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+\b"), "<email>"),
    (re.compile(r"(?<![\w'])'[^'\n]*'(?!\w)"), "<str>"),
    (re.compile(r'"[^"\n]*"'), "<str>"),
    (
        re.compile(
            r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?"
            r"(?:Z|[+\-]\d{2}:?\d{2})?)?\b"
            r"|\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"
        ),
        "<time>",
    ),
    (re.compile(r"\b[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}\b", re.IGNORECASE), "<uuid>"),
    (re.compile(r"\b0x[0-9a-f]+\b", re.IGNORECASE), "<hex>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{6,}\b", re.IGNORECASE), "<hex>"),
    (re.compile(r"\b(?=\w*\d)(?=\w*[a-z])\w{8,}\b", re.IGNORECASE), "<id>"),
    (re.compile(r"\d+(?:\.\d+)*"), "<n>"),
)


def normalise(message: str) -> str:
    """``message`` with its variable parts replaced by placeholders (see the module docstring)."""
    text = message
    for pattern, placeholder in _RULES:
        text = pattern.sub(placeholder, text)
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def fingerprint(job: str | None, exception_type: str, message: str) -> str:
    """The fingerprint of a failure of ``job`` raising ``exception_type`` with ``message``."""
    key = "\x1f".join((job or "", exception_type, normalise(message)))
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:FINGERPRINT_LENGTH]
