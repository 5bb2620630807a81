"""tasks-platform: Celery background jobs that are never lost, retried sensibly and dead-lettered.

Public surface::

    from tasks_platform import app, submit, submit_many, job, RetryPolicy, Priority, errors
"""

from __future__ import annotations

from tasks_platform import errors
from tasks_platform.application import PlatformCelery, create_app
from tasks_platform.bulk import submit_many
from tasks_platform.jobs import JobContext, RetryPolicy, job
from tasks_platform.submit import submit
from tasks_platform.topology import Priority

#: the default app, configured from TASKS_* variables; ``celery -A tasks_platform worker``
app: PlatformCelery = create_app()
celery = app

# the job families register themselves on every app
from tasks_platform.jobs import demo, reports  # noqa: E402, F401, I001 - one line a family
from tasks_platform.jobs import ai  # noqa: E402, F401
from tasks_platform.jobs import payments  # noqa: E402, F401
from tasks_platform.jobs import webhooks  # noqa: E402, F401
from tasks_platform.jobs import email  # noqa: E402, F401
from tasks_platform.jobs import platform  # noqa: E402, F401

__all__ = [
    "JobContext",
    "PlatformCelery",
    "Priority",
    "RetryPolicy",
    "app",
    "create_app",
    "errors",
    "job",
    "submit",
    "submit_many",
]
