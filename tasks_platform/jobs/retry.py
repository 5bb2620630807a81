"""Retry policy: which failures are retried, how often, and after how long.

A pure value object (no Celery here): :meth:`RetryPolicy.decide` turns a failure and the
number of retries already made into a :class:`RetryDecision`.

Delays grow exponentially, ``base * 2**retries`` capped at ``backoff_max``, with *equal
jitter*: the delay is drawn uniformly from the upper half of that value, so that retries of
many jobs failing together spread out while each job's delays still grow. A
``TransientError(retry_after=...)`` (e.g. from an HTTP 429 ``Retry-After``) replaces the
computed delay, still capped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from enum import StrEnum

from tasks_platform.errors import PermanentError, TransientError


class Verdict(StrEnum):
    RETRY = "retry"
    EXHAUSTED = "retries_exhausted"
    PERMANENT = "permanent_error"


@dataclass(frozen=True)
class RetryDecision:
    verdict: Verdict
    delay: float = 0.0

    @property
    def retry(self) -> bool:
        return self.verdict is Verdict.RETRY


@dataclass(frozen=True)
class RetryPolicy:
    """How a job type retries. ``None`` fields take the platform defaults from the settings."""

    max_retries: int | None = None
    backoff_base: float | None = None
    backoff_max: float | None = None
    jitter: bool = True
    #: exception types (besides TransientError) worth retrying; everything else is permanent
    transient: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        for name in ("backoff_base", "backoff_max"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0")
        for exc_type in self.transient:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise TypeError(f"transient must list exception types, got {exc_type!r}")
            if issubclass(exc_type, PermanentError):
                raise TypeError(f"{exc_type.__name__} is a PermanentError; it cannot be transient")

    def with_defaults(
        self, *, max_retries: int, backoff_base: float, backoff_max: float
    ) -> RetryPolicy:
        """This policy with its unset fields filled in."""
        return replace(
            self,
            max_retries=self.max_retries if self.max_retries is not None else max_retries,
            backoff_base=self.backoff_base if self.backoff_base is not None else backoff_base,
            backoff_max=self.backoff_max if self.backoff_max is not None else backoff_max,
        )

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, PermanentError):
            return False
        return isinstance(exc, (TransientError, *self.transient))

    def backoff(self, retries: int, *, rng: random.Random | None = None) -> float:
        """Delay before retry number ``retries + 1`` (``retries`` already made)."""
        base, cap = self._numbers()
        ceiling = min(cap, base * (2.0 ** min(retries, 64)))  # 2**64 outgrows any cap
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(ceiling / 2.0, ceiling)

    def decide(
        self, exc: BaseException, retries: int, *, rng: random.Random | None = None
    ) -> RetryDecision:
        """Retry or give up, after ``retries`` retries already made, on failure ``exc``."""
        if not self.is_transient(exc):
            return RetryDecision(Verdict.PERMANENT)
        if self.max_retries is None:
            raise ValueError("retry policy has no max_retries; call with_defaults() first")
        if retries >= self.max_retries:
            return RetryDecision(Verdict.EXHAUSTED)
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after >= 0:
            _, cap = self._numbers()
            delay = min(float(retry_after), cap)
            if self.jitter:
                delay += (rng or random).uniform(0.0, min(1.0, delay * 0.1))
            return RetryDecision(Verdict.RETRY, delay)
        return RetryDecision(Verdict.RETRY, self.backoff(retries, rng=rng))

    def _numbers(self) -> tuple[float, float]:
        if self.backoff_base is None or self.backoff_max is None:
            raise ValueError("retry policy has no backoff numbers; call with_defaults() first")
        return self.backoff_base, self.backoff_max
