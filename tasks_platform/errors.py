"""The platform's errors.

Every error the platform raises derives from :class:`PlatformError`::

    PlatformError
     ├── ConfigurationError      settings that cannot work (bad URL, placeholder secret, ...)
     ├── DeclarationError        a job declared with an unknown queue, a bad name, a duplicate ...
     ├── UnknownJob              submit() named a job type nobody declared
 ├── UnknownQueue            an operation named a queue the topology does not have
     ├── InvalidPayload          a payload refused at submit time (nothing was queued)
     ├── DeadLetterNotFound      no dead letter with that task id
     └── JobError                raised by job bodies; drives the retry decision
          ├── TransientError     worth retrying (optionally after ``retry_after`` seconds)
          └── PermanentError     never retried: the job is dead-lettered at once

A job body may also raise any exception its declaration lists as transient; every other
exception is treated as permanent.
"""

from __future__ import annotations


class PlatformError(Exception):
    """Root of every error raised by tasks-platform."""


class ConfigurationError(PlatformError):
    """The settings cannot work; the message says which variable and why."""


class DeclarationError(PlatformError):
    """A job type was declared with something the platform does not know."""


class UnknownJob(PlatformError):
    """No job type is declared under that name."""


class UnknownQueue(PlatformError):
    """No work queue has that name."""


class InvalidPayload(PlatformError):
    """The payload does not match the job type's schema; nothing was queued."""


class DeadLetterNotFound(PlatformError):
    """No dead-letter queue holds a message with that task id."""


class JobError(PlatformError):
    """Base class for errors raised from inside a job body."""


class TransientError(JobError):
    """A failure that may go away: the job is retried with backoff.

    ``retry_after`` (seconds), when given, replaces the computed backoff delay, e.g. with the
    value of an HTTP ``Retry-After`` header. It is still capped by the retry policy.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only arguments do not survive the default pickling used between pool processes
        return (_rebuild_transient, (type(self), str(self), self.retry_after), self.__dict__)


def _rebuild_transient(
    cls: type[TransientError], message: str, retry_after: float | None
) -> TransientError:
    return cls(message, retry_after=retry_after)


class PermanentError(JobError):
    """A failure that retrying cannot fix: the job goes to its dead-letter queue at once."""
