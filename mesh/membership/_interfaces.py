"""Which network interfaces a node uses for mDNS, and the addresses it advertises.

exo's users were bitten by discovery on the wrong interface (Docker bridges, VPNs), so
the default is deliberate: interfaces that are up, carry IPv4, and are neither loopback
nor a container or VM bridge. ``--interface`` names them explicitly instead.
"""

import ipaddress
import socket
from dataclasses import dataclass

import psutil

from .._errors import MeshError

# Bridges and virtual links that containers and VMs create on a laptop.
_VIRTUAL_PREFIXES = (
    "docker",
    "br-",
    "veth",
    "virbr",
    "vmnet",
    "vboxnet",
    "cni",
    "flannel",
    "podman",
    "lxc",
    "lxd",
    "kube",
    "cali",
    "weave",
    "tun",
    "tap",
    "zt",
    "utun",
)


class InterfaceError(MeshError, ValueError):
    """An interface that was asked for does not exist or has no IPv4 address."""


@dataclass(frozen=True)
class Interface:
    name: str
    ipv4: tuple[str, ...]


def _ipv4_by_interface() -> dict[str, tuple[str, ...]]:

    stats = psutil.net_if_stats()
    found = {}
    for name, addrs in psutil.net_if_addrs().items():
        ips = tuple(a.address for a in addrs if a.family == socket.AF_INET)
        if ips and name in stats and stats[name].isup:
            found[name] = ips
    return found


def select_interfaces(names: list[str] | None) -> list[Interface]:
    """The named interfaces, or the default LAN set when ``names`` is empty."""
    available = _ipv4_by_interface()
    if names:
        missing = [n for n in names if n not in available]
        if missing:
            raise InterfaceError(
                f"no usable IPv4 interface named {missing}; available: {sorted(available)}"
            )
        return [Interface(n, available[n]) for n in names]
    return [
        Interface(name, ips)
        for name, ips in sorted(available.items())
        if not name.startswith(_VIRTUAL_PREFIXES)
        and not all(ipaddress.ip_address(ip).is_loopback for ip in ips)
    ]


def advertised_addrs(
    listen_addrs: list[str], peer_id: str, interfaces: list[Interface]
) -> list[str]:
    """Dialable multiaddrs: a wildcard listen address becomes one per interface address."""
    result: list[str] = []
    for addr in listen_addrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] == "0.0.0.0":
            ips = [ip for i in interfaces for ip in i.ipv4] or ["127.0.0.1"]
            result.extend("/".join([*parts[:2], ip, *parts[3:]]) for ip in ips)
        else:
            result.append(addr)
    suffix = f"/p2p/{peer_id}"
    return [a if a.endswith(suffix) else a + suffix for a in dict.fromkeys(result)]
