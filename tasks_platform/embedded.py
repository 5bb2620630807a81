"""The embedded broker: kombu's filesystem transport, with atomic writes.

kombu's filesystem transport creates a message file under its final name and then writes
into it; a consumer in another process can rename and read the file in between and get half
a message (seen as a worker that stops taking jobs). Here a message is written under a
temporary name the consumer ignores, flushed, and renamed into place, so a visible message
file is always complete.

A consumer claims a message by renaming it into the processed folder (on the same
filesystem, so the rename is atomic and two consumers never get the same file), reads it and
deletes it, so that neither folder grows. Broker URL scheme: ``embedded://``.
"""

from __future__ import annotations

import os
import uuid
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps, loads

SCHEME = "embedded"


class Channel(filesystem.Channel):
    # kombu's own parents disagree on the parameter name (payload vs message)
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as handle:
                handle.write(dumps(payload).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(partial, final)  # atomic on one filesystem
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(self.processed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except OSError:
                continue  # another consumer claimed it first
            try:
                with open(claimed, "rb") as handle:
                    payload = handle.read()
                os.unlink(claimed)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {claimed!r}") from exc
            return loads(payload.decode("utf-8"))
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel
    driver_type = SCHEME
    driver_name = SCHEME


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
