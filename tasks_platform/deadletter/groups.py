"""Dead letters grouped by error fingerprint (see :mod:`tasks_platform.fingerprint`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tasks_platform.deadletter.letters import DeadLetter, bounded
from tasks_platform.fingerprint import normalise

#: longest example message a group carries
EXAMPLE_LIMIT = 500


@dataclass(frozen=True)
class DeadLetterGroup:
    """Dead letters that share an error fingerprint.

    ``count`` is the number of jobs: the copies of one job a crashed worker left behind count
    once, as they are replayed once. ``first_at``/``last_at`` are unix times.
    """

    fingerprint: str
    name: str | None
    exc_type: str
    #: the normalised message the members share
    message: str
    #: one member's message as it was raised
    example: str
    queues: tuple[str, ...]
    count: int
    task_ids: tuple[str, ...]
    first_at: float | None
    last_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "name": self.name,
            "exc_type": self.exc_type,
            "message": self.message,
            "example": self.example,
            "queues": list(self.queues),
            "count": self.count,
            "task_ids": list(self.task_ids),
            "first_at": self.first_at,
            "last_at": self.last_at,
        }


def group_letters(letters: Iterable[DeadLetter]) -> list[DeadLetterGroup]:
    """Group ``letters`` by fingerprint; the largest groups first, then the most recent."""
    members: dict[str, list[DeadLetter]] = {}
    for letter in letters:
        members.setdefault(letter.fingerprint, []).append(letter)
    groups = [_group(fingerprint, found) for fingerprint, found in members.items()]
    return sorted(groups, key=lambda g: (-g.count, -(g.last_at or 0.0), g.fingerprint))


def _group(fingerprint: str, letters: list[DeadLetter]) -> DeadLetterGroup:
    # in the order they died, whatever order the broker lists them in
    letters = sorted(
        letters, key=lambda letter: (float(letter.dead_at or 0.0), letter.task_id or "")
    )
    first = letters[0]
    task_ids = tuple(dict.fromkeys(letter.task_id for letter in letters if letter.task_id))
    anonymous = sum(1 for letter in letters if not letter.task_id)
    times = [float(letter.dead_at) for letter in letters if letter.dead_at is not None]
    return DeadLetterGroup(
        fingerprint=fingerprint,
        name=first.job,
        exc_type=first.exception_type,
        message=normalise(first.exception_message),
        example=bounded(first.exception_message, EXAMPLE_LIMIT),
        queues=tuple(sorted({letter.queue for letter in letters})),
        count=len(task_ids) + anonymous,
        task_ids=task_ids,
        first_at=min(times, default=None),
        last_at=max(times, default=None),
    )
