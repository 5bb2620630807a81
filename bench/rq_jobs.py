"""RQ, a peer: the no-op job function its workers import (``rq worker`` with this directory
on ``PYTHONPATH``)."""

from __future__ import annotations


def noop() -> None:
    """Does nothing."""
