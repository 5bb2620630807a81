"""Fault injection: a celery worker that SIGKILLs itself right after publishing a dead letter.

Run as ``python kill_after_dead_letter.py -A tasks_platform worker ...``: the dead letter is
published and confirmed, and the worker dies before it acknowledges the original message.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from celery.__main__ import main

import tasks_platform.worker

_publish = tasks_platform.worker.dead_letter


def _publish_then_die(*args: Any, **kwargs: Any) -> None:
    _publish(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


tasks_platform.worker.dead_letter = _publish_then_die
sys.argv[0] = "celery"
sys.exit(main())
