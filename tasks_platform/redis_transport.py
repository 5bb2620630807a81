"""The Redis transport: kombu's, with one client object per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` object for every command it sends outside
its consumer connection: each publish, each monitoring event, each acknowledgement's pipeline.
Building one costs about 50 µs of CPU (its table of reply parsers is made anew each time), and
a worker's main process does it several times per job: on short jobs that process is the
bottleneck. A ``redis.Redis`` object holds no connection of its own (each command takes one
from the channel's pool and gives it back), so one object serves every command and every
thread of the channel. It is built again when the channel replaces its pool (after a
connection error); the consumer's own client, the one waiting in ``BRPOP``, is kombu's as
before.

``celeryconfig`` selects this transport for ``redis://`` broker URLs; ``rediss://`` keeps
kombu's (its TLS checks look at the URL scheme).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis


class Channel(redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(redis.Transport):
    Channel = Channel


#: what ``broker_transport`` names
TRANSPORT = f"{__name__}:Transport"
