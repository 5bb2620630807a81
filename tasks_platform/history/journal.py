"""The history journal: transitions kept on local disk while the history database is down.

Each process appends JSON lines to ``<host>_<pid>_own.jsonl`` in the journal folder. A process
whose database answers again claims its own file and those of processes that no longer run
(by renaming them), writes them, and deletes them. The folder is bounded: what does not fit is
dropped, and every drop is logged as an error with its count.

With write-ahead on, a process also appends every transition, as it records it, to its
*ahead* file ``<host>_<pid>_ahead.jsonl`` (a plain write, no fsync: it survives the process,
not the machine) and empties it whenever everything it recorded is in the database. A process
killed before its next write (SIGKILL, OOM) leaves that file behind, and another process
claims and writes it like any journal file: a worker killed right after its jobs finished
loses none of their history. Ahead files do not count against the journal's size bound.

In a worker with a history writer process (:mod:`tasks_platform.history.shipper`), each of the
worker's processes appends instead to *segments* ``<host>_<pid>_ship-<worker pid>-<n>.jsonl``
that the writer process reads as they grow and deletes once written; nobody else claims them
while that worker runs. They count against the bound.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tasks_platform.history.writer import Transition

logger = logging.getLogger(__name__)
_SUFFIX = ".jsonl"
#: the tag of a process's own write-ahead file (claimed ones get a tag of their own)
AHEAD = "ahead"
#: the tag of a worker process's segments: ``ship-<worker pid>-<number>``
_SEGMENT = re.compile(r"ship-(\d+)-(\d+)")


@dataclass(frozen=True)
class Segment:
    """A segment file: transitions appended by ``pid`` for the writer of worker ``owner``."""

    path: Path
    pid: int
    owner: int
    number: int


class Journal:
    def __init__(self, folder: Path, *, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.host = socket.gethostname()
        self.dropped = 0

    def append(self, transitions: Iterable[Transition]) -> int:
        """Append what fits; returns how many transitions were kept."""
        lines = [t.to_json() + "\n" for t in transitions]
        self.folder.mkdir(parents=True, exist_ok=True)
        room = self.max_bytes - self.size()
        kept: list[str] = []
        for line in lines:
            room -= len(line.encode("utf-8"))
            if room < 0:
                break
            kept.append(line)
        if kept:
            with (self.folder / f"{self.host}_{os.getpid()}_own{_SUFFIX}").open("a") as handle:
                handle.writelines(kept)
                handle.flush()
                os.fsync(handle.fileno())
        lost = len(lines) - len(kept)
        if lost:
            self.dropped += lost
            logger.error(
                "HISTORY LOST: the journal in %s is full (%d bytes); dropped %d transition(s), "
                "%d in all by this process", self.folder, self.max_bytes, lost, self.dropped,
            )  # fmt: skip
        return len(kept)

    def size(self) -> int:
        """Bytes of spilled transitions (unclaimed write-ahead files aside)."""
        if not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.iterdir()
                   if p.is_file() and _parts(p)[2] != AHEAD)  # fmt: skip

    def ahead_path(self) -> Path:
        """This process's write-ahead file."""
        return self.folder / f"{self.host}_{os.getpid()}_{AHEAD}{_SUFFIX}"

    def segment_path(self, owner: int, number: int) -> Path:
        """This process's segment ``number``, for the history writer of worker ``owner``."""
        return self.folder / f"{self.host}_{os.getpid()}_ship-{owner}-{number}{_SUFFIX}"

    def segments(self, owner: int) -> list[Segment]:
        """The segments of worker ``owner``'s processes on this host, each process's in order."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob(f"{self.host}_*_ship-{owner}-*{_SUFFIX}"):
            segment = _segment(path)
            if segment is not None and segment.owner == owner:
                found.append(segment)
        return sorted(found, key=lambda s: (s.pid, s.number))

    def claim(self) -> list[Path]:
        """Take this process's files and those of processes on this host that stopped.

        A file is named ``<host>_<pid>_<tag>.jsonl`` after the process that holds it (the
        writer, or the one that claimed it); pid 0 means nobody.
        """
        if not self.folder.is_dir():
            return []
        claimed = []
        for path in sorted(self.folder.glob(f"*{_SUFFIX}")):
            host, pid, tag = _parts(path)
            if host != self.host or (pid != os.getpid() and alive(pid)):
                continue
            segment = _segment(path)
            if segment is not None and alive(segment.owner):
                continue  # its worker's writer process writes it
            if pid == os.getpid() and tag == AHEAD:
                continue  # still being written: emptied once its transitions are written
            fresh = f"{tag.split('-')[0]}-{uuid.uuid4().hex[:6]}"
            target = path.with_name(f"{host}_{os.getpid()}_{fresh}{_SUFFIX}")
            try:
                path.rename(target)
            except OSError:
                continue  # another process claimed it first
            claimed.append(target)
        return claimed

    def read(self, path: Path) -> list[Transition]:
        transitions, bad = parse(path.read_bytes().splitlines())
        if bad:
            logger.error("history journal %s: %d unreadable line(s) skipped", path.name, bad)
        return transitions

    def release(self, path: Path) -> None:
        """Give a claimed file back, to be written later by whoever claims it."""
        host, _, tag = _parts(path)
        path.rename(path.with_name(f"{host}_0_{tag}{_SUFFIX}"))

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)


def parse(lines: Iterable[str | bytes]) -> tuple[list[Transition], int]:
    """The transitions of JSON ``lines``, and how many lines could not be read (cut short by
    a crash)."""
    transitions, bad = [], 0
    for line in lines:
        try:
            transitions.append(Transition.from_json(line))
        except (ValueError, TypeError, KeyError):
            bad += 1
    return transitions, bad


def _parts(path: Path) -> tuple[str, int, str]:
    stem = path.name[: -len(_SUFFIX)]
    host_pid, _, tag = stem.rpartition("_")
    host, _, pid = host_pid.rpartition("_")
    return host, int(pid) if pid.isdigit() else 0, tag


def _segment(path: Path) -> Segment | None:
    _, pid, tag = _parts(path)
    match = _SEGMENT.fullmatch(tag)
    if match is None:
        return None
    return Segment(path, pid, int(match.group(1)), int(match.group(2)))


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
