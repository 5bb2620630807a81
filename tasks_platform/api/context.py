"""What the API's routes work with: the Celery app, the history database, the domain objects.

One :class:`ApiContext` per served application; routes get it through :func:`get_context`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.api.submission import Submissions
from tasks_platform.control import Control
from tasks_platform.deadletter import DeadLetters
from tasks_platform.stats import Stats

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery


@dataclass
class ApiContext:
    app: PlatformCelery
    engine: Engine
    sessions: sessionmaker[Session]

    @cached_property
    def control(self) -> Control:
        return Control(self.app, self.sessions)

    @cached_property
    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.app, self.sessions)

    @cached_property
    def stats(self) -> Stats:
        return Stats(self.app, self.sessions)

    @cached_property
    def submissions(self) -> Submissions:
        return Submissions(self.app, self.sessions)


def get_context(request: Request) -> ApiContext:
    context = request.app.state.context
    assert isinstance(context, ApiContext)
    return context


Context = Annotated[ApiContext, Depends(get_context)]
