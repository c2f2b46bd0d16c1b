"""LAN discovery with zeroconf, bound to the interfaces the node was given.

The service type carries the mesh id (``_salala-1a2b3c4d._tcp.local.``), so nodes of
other meshes never even show up. Each node publishes its peer id and multiaddrs in TXT
records and reports every other node it resolves. zeroconf runs its own thread; its
callbacks only hand names over to trio, and every blocking call goes through a worker
thread with a timeout.
"""

import logging
import socket
from collections.abc import Callable
from typing import Any

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from ._interfaces import Interface, InterfaceError

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
_QUEUE = 256


def service_type(mesh_id: str) -> str:
    return f"_salala-{mesh_id}._tcp.local."


def _txt(peer_id: str, addrs: list[str]) -> dict[str, str]:
    return {"id": peer_id, **{f"a{i}": addr for i, addr in enumerate(addrs[:16])}}


def _read_txt(info: ServiceInfo) -> tuple[str, list[str]] | None:
    props = {
        k.decode(errors="replace"): (v or b"").decode(errors="replace")
        for k, v in (info.properties or {}).items()
    }
    peer_id = props.get("id")
    if not peer_id:
        return None
    addrs = [props[k] for k in sorted(props) if k.startswith("a") and k[1:].isdigit()]
    return peer_id, [a for a in addrs if a.endswith(f"/p2p/{peer_id}")]


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
        async for name, removed in names_receive:
            if removed:  # stop dialing it; whether it is alive is membership's call
                lost(name.removesuffix(f".{kind}"))
                continue
            resolved = await trio.to_thread.run_sync(
                lambda name=name: zc.get_service_info(kind, name, RESOLVE_TIMEOUT_MS)
            )
            entry = _read_txt(resolved) if resolved is not None else None
            if entry is not None and entry[0] != peer_id and entry[1]:
                found(*entry)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            if browser is not None:
                browser.cancel()
            await trio.to_thread.run_sync(zc.close)  # unregisters our service as it closes
