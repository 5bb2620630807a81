"""Job declaration (:func:`job`, :class:`RetryPolicy`) and the job families."""

from __future__ import annotations

from tasks_platform.jobs.declaration import JobContext, PlatformTask, job
from tasks_platform.jobs.retry import RetryDecision, RetryPolicy

__all__ = ["JobContext", "PlatformTask", "RetryDecision", "RetryPolicy", "job"]
