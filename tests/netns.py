"""Private test LANs: network namespaces joined by a bridge in a hub namespace.

Nothing is created in the machine's own namespace: each host namespace gets ``lan0``
(one end of a veth pair) with an address in 10.77.0.0/24, the other end is enslaved to a
bridge that lives in its own namespace. Tests skip where ``ip netns`` is not permitted.
"""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def require_netns() -> None:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    probe = f"salala-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"network namespaces are not permitted here: {exc}")
    _ip("netns", "del", probe)


@contextmanager
def private_lan(hosts: int) -> Iterator[list[tuple[str, str]]]:
    """Yield ``(namespace, ipv4)`` for each host on a fresh bridged LAN."""
    require_netns()
    tag = f"salala{os.getpid() % 100000}"
    hub = f"{tag}-hub"
    created = []
    try:
        _ip("netns", "add", hub)
        created.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        lan = []
        for i in range(1, hosts + 1):
            namespace, address = f"{tag}-h{i}", f"10.77.0.{i}"
            _ip("netns", "add", namespace)
            created.append(namespace)
            _ip(
                "link",
                "add",
                "lan0",
                "netns",
                namespace,
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                hub,
            )
            _ip("-n", hub, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "lan0")
            _ip("-n", namespace, "link", "set", "lan0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            lan.append((namespace, address))
        yield lan
    finally:
        for namespace in reversed(created):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
