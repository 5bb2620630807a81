"""The platform's errors.

Every error the platform raises derives from :class:`PlatformError`::

    PlatformError
     ├── ConfigurationError      settings that cannot work (bad URL, placeholder secret, ...)
     ├── DeclarationError        a job declared with an unknown queue, a bad name, a duplicate ...
     ├── UnknownJob              submit() named a job type nobody declared
     ├── UnknownQueue            an operation named a queue the topology does not have
     ├── InvalidPayload          a payload refused at submit time (nothing was queued)
     ├── LimitsUnavailable       the Redis keeping tenant limits did not answer (nothing was queued)
     ├── BrokerUnavailable       the broker could not be reached: the job was not published
     │    └── PublishNotConfirmed    a publish whose outcome is unknown: the job may be queued
     ├── HistoryUnavailable      the history database did not answer a submission that needs it
     ├── IdempotencyConflict     an idempotency key already names a job of another type
     ├── DeadLetterNotFound      no dead letter with that task id
     │    └── DeadLetterGroupNotFound   no dead letter has that error fingerprint
     ├── JobNotFound             no job with that id in the history
     ├── JobFinished             a cancel came too late: the job already ended
     ├── JobNotRetryable         retry named a job that has not failed, or whose payload is lost
     └── JobError                raised by job bodies; drives the retry decision
          ├── TransientError     worth retrying (optionally after ``retry_after`` seconds)
          ├── PermanentError     never retried: the job is dead-lettered at once
          └── JobCancelled       an operator cancelled the running job: it stops, never retried

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


class LimitsUnavailable(PlatformError):
    """The Redis that keeps tenant limits did not answer: a limited job is neither queued nor
    run unlimited (nothing was queued; a worker puts the message back)."""


class BrokerUnavailable(PlatformError):
    """Publishing a job failed: the broker could not be reached or refused the connection.

    The job is not queued (``delay()``/``apply_async``); submit it again, or submit it through
    the outbox (:mod:`tasks_platform.outbox`), which keeps it until the broker is back.
    """


class PublishNotConfirmed(BrokerUnavailable):
    """A publish whose outcome is unknown: the broker did not confirm it (RabbitMQ publisher
    confirms: a nack, or no answer within the confirm timeout), or the connection was lost
    while publishing. The job may be queued or not, so it is reported, never assumed.

    Submit it again with its idempotency key: the job runs once either way (a worker drops the
    second copy of a job whose first copy did reach the broker).
    """


class HistoryUnavailable(PlatformError):
    """A submission that writes the history first (an idempotency key, the admin API) could not
    reach the history database: nothing was queued; submit it again (with the same key)."""


class IdempotencyConflict(PlatformError):
    """An idempotency key cannot give a job: nothing was queued.

    ``code`` says why: ``idempotency_conflict`` (the key, within its tenant, was used for a job
    of another type) or ``idempotency_in_flight`` (another submission with the key keeps
    failing to publish; try again later).
    """

    def __init__(self, message: str, *, code: str = "idempotency_conflict") -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_conflict, (type(self), str(self), self.code), self.__dict__)


def _rebuild_conflict(
    cls: type[IdempotencyConflict], message: str, code: str
) -> IdempotencyConflict:
    return cls(message, code=code)


class DeadLetterNotFound(PlatformError):
    """No dead-letter queue holds a message with that task id."""


class DeadLetterGroupNotFound(DeadLetterNotFound):
    """No dead-letter queue holds a message with that error fingerprint."""


class JobNotFound(PlatformError):
    """No job with that id is in the history."""


class JobFinished(PlatformError):
    """The job already ended (succeeded, dead, cancelled ...): there is nothing to cancel."""


class JobNotRetryable(PlatformError):
    """The job cannot be retried: it has not failed, its type is gone, or its payload is lost."""


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


class JobCancelled(JobError):
    """Raised by :meth:`JobContext.raise_if_cancelled`: an operator cancelled the running job.

    The job stops where it is: it is recorded ``revoked`` and acknowledged, never retried and
    never dead-lettered.
    """
