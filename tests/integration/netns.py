"""Worker "hosts" on one machine: network namespaces joined to the root one by veth pairs.

Each host gets a /30 of its own: ``.1`` on the root side, ``.2`` inside, and a default route
through the root side. The servers listen on 127.0.0.1 only, so the tests forward a port on
each root-side address to them (``tcp_proxy.TcpProxy``). ``cut()`` takes the root end of a
host's link down, like a pulled cable: its TCP connections stall, nothing is reset; ``heal()``
plugs it back in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    namespace: str
    root_link: str
    root_address: str
    address: str

    def launcher(self, *command: str) -> list[str]:
        """``command`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def cut(self) -> None:
        ip("link", "set", self.root_link, "down")

    def heal(self) -> None:
        ip("link", "set", self.root_link, "up")


def namespaces_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"tpprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if made.returncode != 0:
        return f"ip netns add fails: {made.stderr.strip()}"
    ip("netns", "del", probe)
    return None


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    """A private /24 that no interface of this machine is on (random: runs may overlap)."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    for _ in range(100):
        network = ipaddress.IPv4Network(
            f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24"
        )
        if f" {str(network.network_address)[:-1]}" not in used:
            return network
    raise RuntimeError("no free 10.x.y.0/24 for the test hosts")


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """``count`` hosts, deleted afterwards whatever happens."""
    run = uuid.uuid4().hex[:6]
    subnet = _free_subnet()
    made: list[Host] = []
    try:
        for n in range(count):
            base = subnet.network_address + 4 * n
            host = Host(namespace=f"tp{run}h{n}", root_link=f"tp{run}r{n}",
                        root_address=str(base + 1), address=str(base + 2))  # fmt: skip
            inner = f"tp{run}n{n}"
            ip("netns", "add", host.namespace)
            made.append(host)
            ip("link", "add", host.root_link, "type", "veth", "peer", "name", inner,
               "netns", host.namespace)  # fmt: skip
            ip("addr", "add", f"{host.root_address}/30", "dev", host.root_link)
            ip("link", "set", host.root_link, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.address}/30", "dev", inner)
            ip("-n", host.namespace, "link", "set", inner, "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")
            ip("-n", host.namespace, "route", "add", "default", "via", host.root_address)
        yield made
    finally:
        for host in made:
            with contextlib.suppress(RuntimeError):  # deleting the namespace deletes its veth
                ip("netns", "del", host.namespace)
            with contextlib.suppress(RuntimeError):
                ip("link", "del", host.root_link)  # already gone with its peer, normally
