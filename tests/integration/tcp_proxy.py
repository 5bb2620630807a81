"""A loopback TCP proxy that a test can cut and restore, to simulate a database outage."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class TcpProxy:
    """Forwards <host>:<port> to ``target``; ``cut()`` drops every connection and refuses.

    ``hold_replies(after=marker)`` keeps forwarding what clients send, but once a client sent
    ``marker`` drops what the server answers (a reply lost on the way): the publish carrying
    the marker then reaches the broker and is never confirmed.

    ``host`` is 127.0.0.1 unless a test listens on another local address (a veth's end).
    """

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        probe = socket.socket()
        probe.bind((host, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self.holding = False
        self._marker: bytes | None = None

    def hold_replies(self, *, after: bytes) -> None:
        self._marker = after

    def start(self) -> TcpProxy:
        """Listen (again, after a cut), forwarding both ways."""
        self.holding, self._marker = False, None
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is a and self._marker is not None and self._marker in data:
                        self.holding = True
                    if not (self.holding and source is b):
                        peers[source].sendall(data)
        except (OSError, ValueError):  # ValueError: cut() closed a socket select() was given
            return
        finally:
            for end in (a, b):
                with contextlib.suppress(OSError):
                    end.close()
