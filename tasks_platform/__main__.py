"""``python -m tasks_platform``: the ``tasks-platform`` command."""

from tasks_platform.cli import run

run()
