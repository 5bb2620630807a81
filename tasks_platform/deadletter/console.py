"""The dead-letter console: list, show, group, replay and purge, each replay/purge audited.

Inspecting a queue of dead letters takes its messages without acknowledging them and puts
back those not acted upon, so a listing briefly reorders the queue; nobody consumes
dead-letter queues, so that is harmless. A pass takes at most the messages the queue held
when it began, so a replayed job that dies again while the pass goes on is left for the next.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection
from kombu.message import Message
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tasks_platform.audit import record_action
from tasks_platform.deadletter.groups import DeadLetterGroup, group_letters
from tasks_platform.deadletter.letters import DeadLetter, read_letter
from tasks_platform.deadletter.publish import publish_work, replay_headers
from tasks_platform.errors import DeadLetterGroupNotFound, DeadLetterNotFound, UnknownQueue
from tasks_platform.history.database import create_history_engine, session_factory
from tasks_platform.history.models import AuditEntry, JobState
from tasks_platform.history.recorder import prepare_embedded_database, record
from tasks_platform.history.writer import Transition
from tasks_platform.jobs.declaration import REPLAYS_HEADER
from tasks_platform.topology import DEAD_SUFFIX, QUEUES, Topology

if TYPE_CHECKING:
    from tasks_platform.application import PlatformCelery

logger = logging.getLogger(__name__)

#: task ids an audit entry lists in full (the count is always exact)
AUDITED_IDS_LIMIT = 1_000
_ALL = 1_000_000_000


class DeadLetters:
    """List, show, group, replay and purge dead letters; every replay and purge is audited.

    ``sessions`` opens sessions on the history database, where the audit log lives. Without it,
    each replay or purge connects to ``settings.effective_database_url`` for its audit entry
    (bringing the embedded SQLite database to the current schema first, as the recorder does).
    The audit log is checked before anything is touched: if it cannot be reached, nothing is
    replayed or purged.
    """

    def __init__(self, app: PlatformCelery, sessions: sessionmaker[Session] | None = None) -> None:
        self.app = app
        self.topology: Topology = app.topology
        self.sessions = sessions

    def counts(self) -> dict[str, int]:
        """Number of dead letters per queue (family)."""
        with self._channel() as channel:
            return {
                family: int(self.topology.dead_queue(family)(channel).queue_declare().message_count)
                for family in QUEUES
            }

    def list(
        self, queue: str | None = None, *, group: str | None = None, limit: int = 100
    ) -> builtins.list[DeadLetter]:
        """Dead letters of ``queue`` (or all), of ``group`` only if given; at most ``limit``."""
        chosen = _selector(None, _group_key(group))
        found: builtins.list[DeadLetter] = []
        for family in self._families(queue):
            wanted = limit - len(found) if chosen is None else _ALL
            letters = self._scan(family, act=None, limit=wanted)
            found += [letter for letter in letters if chosen is None or chosen(letter)]
            if len(found) >= limit:
                break
        return found[:limit]

    def show(self, task_id: str) -> DeadLetter:
        for family in QUEUES:
            letters = [
                letter for letter in self._scan(family, act=None) if letter.task_id == task_id
            ]
            if letters:
                return letters[0]
        raise DeadLetterNotFound(f"no dead letter with task id {task_id!r}")

    def groups(self, queue: str | None = None) -> builtins.list[DeadLetterGroup]:
        """Dead letters of ``queue`` (or all) grouped by error fingerprint, largest group first."""
        families = self._families(queue)
        return group_letters(letter for f in families for letter in self._scan(f, act=None))

    def replay(
        self,
        *,
        task_id: str | None = None,
        queue: str | None = None,
        group: str | None = None,
        actor: str,
        reason: str | None = None,
    ) -> builtins.list[str]:
        """Re-publish dead letters to their work queue (attempts reset); returns their ids.

        With ``task_id`` every copy of that job is replayed once (copies share the id); with
        ``queue`` that whole queue; with ``group`` the members of that fingerprint group; given
        together they narrow each other; with none, every dead-letter queue. One audit entry
        records ``actor``, ``reason`` and the task ids.
        """
        replayed: builtins.list[str] = []
        seen: set[str] = set()

        def act(message: Message, letter: DeadLetter) -> None:
            if letter.task_id is not None and letter.task_id in seen:
                return  # a duplicate copy of a job already replayed: drop it
            headers = replay_headers(message)
            publish_work(self.app, message, letter.queue, headers)
            replayed.append(letter.task_id or "")
            if letter.task_id:
                seen.add(letter.task_id)
                facts = {"name": letter.job, "queue": letter.queue}
                replays = headers[REPLAYS_HEADER]
                queued = Transition(letter.task_id, JobState.QUEUED, 1, time.time(),
                                    replays=replays, facts=facts)  # fmt: skip
                record(self.app, queued)

        key = _group_key(group)
        target = self._target(task_id, queue, key)
        with self._audited("dlq.replay", target, actor=actor, reason=reason) as detail:
            self._act(task_id=task_id, queue=queue, group=key, act=act)
            _require_found(bool(replayed), task_id=task_id, group=key)
            detail.update(_ids_detail(replayed))
        return replayed

    def purge(
        self,
        *,
        task_id: str | None = None,
        queue: str | None = None,
        group: str | None = None,
        actor: str,
        reason: str | None = None,
    ) -> int:
        """Delete dead letters for good; returns how many messages were removed.

        Selects like :meth:`replay`; one audit entry records ``actor``, ``reason`` and the ids.
        """
        purged: builtins.list[str] = []

        def act(message: Message, letter: DeadLetter) -> None:
            purged.append(letter.task_id or "")

        key = _group_key(group)
        target = self._target(task_id, queue, key)
        with self._audited("dlq.purge", target, actor=actor, reason=reason) as detail:
            self._act(task_id=task_id, queue=queue, group=key, act=act)
            _require_found(bool(purged), task_id=task_id, group=key)
            detail.update(_ids_detail(list(dict.fromkeys(purged))), messages=len(purged))
        return len(purged)

    # -- internals ---------------------------------------------------------------------------
    def _act(
        self,
        *,
        task_id: str | None,
        queue: str | None,
        group: str | None,
        act: Callable[[Message, DeadLetter], None],
    ) -> None:
        chosen = _selector(task_id, group)
        for family in self._families(queue):
            self._scan(family, act=act, select=chosen)

    def _families(self, queue: str | None) -> tuple[str, ...]:
        if queue is None:
            return QUEUES
        family = queue.removesuffix(DEAD_SUFFIX).removeprefix(self.topology.prefix)
        try:
            self.topology.check_family(family)
        except ValueError as exc:
            raise UnknownQueue(str(exc)) from None
        return (family,)

    def _target(self, task_id: str | None, queue: str | None, group: str | None) -> str:
        """What an operation acts on, for the audit log: ``job:ID queue:Q group:FP`` or ``all``."""
        family = None if queue is None else self._families(queue)[0]
        parts = [("job", task_id), ("queue", family), ("group", group)]
        return " ".join(f"{kind}:{value}" for kind, value in parts if value is not None) or "all"

    @contextmanager
    def _audited(
        self, action: str, target: str, *, actor: str, reason: str | None
    ) -> Iterator[dict[str, Any]]:
        """Check the audit log answers, let the caller act and fill in ``detail``, record it."""
        with self._session_maker() as sessions:
            with sessions() as session:
                session.execute(select(AuditEntry.id).limit(1))
            detail: dict[str, Any] = {}
            yield detail
            try:
                with sessions.begin() as session:
                    record_action(session, actor=actor, action=action, target=target,
                                  reason=reason or None, detail=detail)  # fmt: skip
            except SQLAlchemyError:
                logger.exception("%s of %s by %s is done but not in the audit log: %s",
                                 action, target, actor, json.dumps(detail))  # fmt: skip
                raise

    @contextmanager
    def _session_maker(self) -> Iterator[sessionmaker[Session]]:
        if self.sessions is not None:
            yield self.sessions
            return
        settings = self.app.settings
        if settings.effective_database_url.startswith("sqlite"):
            prepare_embedded_database(settings)
        engine = create_history_engine(settings)
        try:
            yield session_factory(engine)
        finally:
            engine.dispose()

    @contextmanager
    def _channel(self) -> Iterator[Any]:
        with self.app.connection_for_write() as connection:
            assert isinstance(connection, Connection)
            channel = connection.channel()
            try:
                yield channel
            finally:
                channel.close()

    def _scan(
        self,
        family: str,
        *,
        act: Callable[[Message, DeadLetter], None] | None,
        select: Callable[[DeadLetter], bool] | None = None,
        limit: int = _ALL,
    ) -> builtins.list[DeadLetter]:
        """Take the queue's messages; ``act`` on (and ack) the selected ones; put back the rest.

        Only as many messages as the queue held at the start are taken: a replayed job that
        dies again during the pass is not seen (and not mistaken for a copy) until the next.
        """
        seen: builtins.list[DeadLetter] = []
        held: builtins.list[Message] = []
        with self._channel() as channel:
            queue = self.topology.dead_queue(family)(channel)
            queue.declare()
            present = int(queue.queue_declare().message_count)
            try:
                for _ in range(min(limit, present)):
                    message = queue.get(no_ack=False)
                    if message is None:
                        break
                    letter = read_letter(family, message)
                    if act is not None and (select is None or select(letter)):
                        act(message, letter)
                        message.ack()
                    else:
                        held.append(message)
                    seen.append(letter)
            finally:
                for message in held:
                    message.requeue()
        return seen


def _group_key(group: str | None) -> str | None:
    return None if group is None else group.strip().lower()


def _selector(task_id: str | None, group: str | None) -> Callable[[DeadLetter], bool] | None:
    """Which letters an operation takes: those of ``task_id`` and/or ``group``; None = all."""
    if task_id is None and group is None:
        return None

    def chosen(letter: DeadLetter) -> bool:
        return (task_id is None or letter.task_id == task_id) and (
            group is None or letter.fingerprint == group
        )

    return chosen


def _require_found(found: bool, *, task_id: str | None, group: str | None) -> None:
    if found:
        return
    if task_id is not None:
        raise DeadLetterNotFound(f"no dead letter with task id {task_id!r}")
    if group is not None:
        raise DeadLetterGroupNotFound(f"no dead letters in group {group!r}")


def _ids_detail(task_ids: builtins.list[str]) -> dict[str, Any]:
    """The audit detail of an operation on these jobs: count, ids (bounded)."""
    named = [task_id for task_id in task_ids if task_id]
    detail: dict[str, Any] = {"count": len(task_ids), "task_ids": named[:AUDITED_IDS_LIMIT]}
    if len(named) > AUDITED_IDS_LIMIT:
        detail["task_ids_truncated"] = True
    return detail
