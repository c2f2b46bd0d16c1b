"""LAN discovery with zeroconf, bound to the interfaces the node was given.

The service type carries the mesh id (``_salala-1a2b3c4d._tcp.local.``), so nodes of
other meshes never even show up. Each node publishes its peer id and multiaddrs in TXT
records and reports every other node it resolves. zeroconf runs its own thread; its
callbacks only hand names over to trio, and every blocking call goes through a worker
thread with a timeout.

Anyone on the LAN can publish records of our service type, so each record passes
``_discovered.from_mdns`` before anything reads it, and nothing a record does can end
this task: a name that fails to resolve or parse is dropped with a debug line.
"""

import logging
import socket
from collections.abc import Callable
from typing import Any

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from ._discovered import dropped, from_mdns
from ._interfaces import Interface, InterfaceError

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
_QUEUE = 256
_NAMES = 256  # record names we remember the peer id of, to act on their removal


def service_type(mesh_id: str) -> str:
    return f"_salala-{mesh_id}._tcp.local."


def _txt(peer_id: str, addrs: list[str]) -> dict[str, str]:
    return {"id": peer_id, **{f"a{i}": addr for i, addr in enumerate(addrs[:16])}}


async def run_mdns(
    *,
    mesh_id: str,
    peer_id: str,
    addrs: list[str],
    interfaces: list[Interface],
    found: Callable[[str, list[str]], None],
    lost: Callable[[str], None],
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Advertise this node; call ``found(peer_id, addrs)`` per peer resolved, ``lost(peer_id)``
    when its record goes away."""
    ips = [ip for interface in interfaces for ip in interface.ipv4]
    if not ips:
        log.warning("mDNS is off: no usable interface (choose one with --interface)")
        task_status.started()
        return
    kind = service_type(mesh_id)
    port = next((int(a.split("/")[4]) for a in addrs if a.split("/")[3:4] == ["tcp"]), 0)
    info = ServiceInfo(
        kind,
        f"{peer_id}.{kind}",
        addresses=[socket.inet_aton(ip) for ip in ips],
        port=port,
        properties=_txt(peer_id, addrs),
        server=f"salala-{peer_id[-12:].lower()}.local.",
    )
    try:
        zc = await trio.to_thread.run_sync(
            lambda: Zeroconf(interfaces=ips, ip_version=IPVersion.V4Only)
        )
    except OSError as exc:
        names = ", ".join(i.name for i in interfaces)
        raise InterfaceError(
            f"mDNS cannot use {names}: {exc} (choose another --interface)"
        ) from exc
    names_send, names_receive = trio.open_memory_channel[tuple[str, bool]](_QUEUE)
    token = trio.lowlevel.current_trio_token()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        removed = state_change is ServiceStateChange.Removed
        try:
            trio.from_thread.run_sync(names_send.send_nowait, (name, removed), trio_token=token)
        except (trio.WouldBlock, trio.RunFinishedError):
            pass  # a full queue drops a name; the browser asks again later

    browser = None
    try:
        await trio.to_thread.run_sync(lambda: zc.register_service(info, allow_name_change=True))
        browser = ServiceBrowser(zc, kind, handlers=[on_change])
        log.info("mDNS on %s as %s", ", ".join(i.name for i in interfaces), kind)
        task_status.started()
        peers_by_name: dict[str, str] = {}
        async for name, removed in names_receive:
            if removed:  # stop dialing it; whether it is alive is membership's call
                if name in peers_by_name:
                    lost(peers_by_name.pop(name))
                continue
            try:
                resolved = await trio.to_thread.run_sync(
                    lambda name=name: zc.get_service_info(kind, name, RESOLVE_TIMEOUT_MS)
                )
                entry = from_mdns(resolved.properties or {}) if resolved is not None else None
                if entry is not None and entry[0] != peer_id:
                    peers_by_name.pop(name, None)
                    peers_by_name[name] = entry[0]
                    while len(peers_by_name) > _NAMES:
                        del peers_by_name[next(iter(peers_by_name))]
                    found(*entry)
            except Exception as exc:  # zeroconf's refusals of a hostile name or record
                dropped("mdns", f"record {name[:80]!r}: {exc!r}")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            if browser is not None:
                browser.cancel()
            await trio.to_thread.run_sync(zc.close)  # unregisters our service as it closes
