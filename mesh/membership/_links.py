"""Where direct links listen, and whom they may link with: read from settings and
from members' signed adverts.

A listen multiaddr ending in ``/tls`` (``/ip4/0.0.0.0/tcp/4002/tls``) places the direct
link's listener; without one it listens on the hosts libp2p listens on, on a port the
system picks. Either way it follows libp2p's interface rules: a wildcard host is
reachable on the addresses the advert lists, a specific host only there.
"""

from typing import Any

from .._errors import ListenAddressError
from ..wire import LinkAddress


def split_listen(listen: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """(libp2p's listen multiaddrs, the direct link's (host, port) binds)."""
    libp2p: list[str] = []
    tls: list[str] = []
    for addr in listen:
        (tls if addr.rstrip("/").endswith("/tls") else libp2p).append(addr)
    sources = tls or libp2p
    binds = []
    for addr in sources:
        parts = addr.rstrip("/").split("/")
        if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            if addr in tls:
                raise ListenAddressError(
                    f"a direct link listens on /ip4|ip6/HOST/tcp/PORT/tls, not {addr!r}"
                )
            continue
        try:
            port = int(parts[4])
        except ValueError as exc:
            raise ListenAddressError(f"invalid port in {addr!r}") from exc
        if not 0 <= port < 65536:
            raise ListenAddressError(f"invalid port in {addr!r}")
        binds.append((parts[2], port if tls else 0))
    return libp2p, binds


def link_address(
    addrs: tuple[str, ...], link: dict[str, Any] | None, incarnation: int
) -> LinkAddress | None:
    """How to reach a member's direct link: the hosts of its advertised (signed)
    multiaddrs, with its link port and pin."""
    if link is None:
        return None
    hosts = []
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            hosts.append(parts[2])
    if not hosts:
        return None
    return LinkAddress(
        tuple(dict.fromkeys(hosts)), int(link["port"]), str(link["pin"]), incarnation
    )
