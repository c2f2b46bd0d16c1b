"""A node's membership of its mesh: who is in it, how to reach them, who to keep out.

One ``Mesh`` owns the libp2p host's protocol handlers and a nursery of tasks:

- *refresh*: re-reads this node's capacity every 2 s and publishes a new advert when it
  moved materially, its fragments changed, or 30 s have passed;
- *maintain*: evicts silent members, drops connections that never authenticated, and
  starts a *peer task* for every member, bootstrap peer or mDNS find it is not talking to;
- *peer task* (one per peer): dial, prove the mesh key, then exchange membership every
  2 s until an exchange fails; its exit schedules a retry with backoff;
- *mDNS* (optional): advertise and browse on the chosen interfaces.

Every stream operation has a deadline; every handler catches everything and resets its
stream, so no peer can take the host down. Until a peer passes the mesh-key handshake
the host lets it negotiate nothing but that handshake (``_host.admit``). Whatever
discovery hands us passes ``_discovered`` first, and what it can grow is bounded: the
member table (``_table.MAX_MEMBERS``) and the peers found by mDNS (MAX_MDNS_TARGETS).
"""

import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from .._errors import AuthError, MeshError, WireError
from .._peerid import short_id
from ..wire import (
    DirectLinks,
    LinkAddress,
    SchemaError,
    load_link_identity,
    read_message,
    write_message,
)
from . import _auth, _sync
from ._adverts import Advert, advert_from_wire, capacity_changed
from ._discovered import dropped, settings_targets
from ._host import admit, open_host, parse_multiaddrs
from ._interfaces import Interface, advertised_addrs, select_interfaces
from ._invite import make_invite
from ._links import link_address, split_listen
from ._mdns import run_mdns
from ._meshkey import MeshKey
from ._table import Change, Membership

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # membership exchange with each member; also the RTT probe
CAPACITY_PROBE_S = 2.0  # re-read local capacity; a material change is advertised at once
ADVERT_MAX_AGE_S = 30.0  # re-advertise at least this often even if nothing moved
EXCHANGE_TIMEOUT_S = 3.0
SILENT_S = 7.0  # evict a member not heard from directly for this long
AUTH_GRACE_S = 5.0
DIAL_TIMEOUT_S = 5.0
DISCONNECT_TIMEOUT_S = 2.0
RETRY_MIN_S = 0.5
RETRY_MAX_S = 8.0
MAINTAIN_S = 0.5
STREAMS_PER_PEER = 16  # open inbound streams one member may hold per protocol
MAX_MDNS_TARGETS = 64  # peers found by mDNS that we dial before they are members


@dataclass(frozen=True)
class LocalState:
    """What this node advertises about itself right now."""

    capacity: dict[str, Any]
    fragments: list[str]
    serving: list[dict[str, Any]] = field(default_factory=list)
    undeployed: list[dict[str, Any]] = field(default_factory=list)


LocalStateReader = Callable[[], LocalState]


@dataclass(frozen=True)
class MeshConfig:
    key: MeshKey
    listen: list[str]
    peers: list[str] = field(default_factory=list)
    interfaces: list[str] | None = None
    mdns: bool = True
    name: str = field(default_factory=socket.gethostname)
    link_dir: Path | None = None  # the direct link's certificate; None: libp2p only


class Mesh:
    def __init__(
        self,
        host: IHost,
        key_pair: KeyPair,
        config: MeshConfig,
        local_state: LocalStateReader,
        interfaces: list[Interface],
        targets: dict[str, list[str]],
        direct: DirectLinks | None = None,
    ) -> None:
        self._host = host
        self.direct = direct
        self._key_pair = key_pair
        self.config = config
        self._local_state = local_state
        self.peer_id = host.get_id().to_base58()
        self.interfaces = interfaces
        self.addrs = advertised_addrs(
            [str(a) for a in host.get_addrs()], self.peer_id, self.interfaces
        )
        self._targets = {p: a for p, a in targets.items() if p != self.peer_id}  # peer -> addrs
        self._mdns_found: dict[str, None] = {}  # ordered: the oldest find first
        self._mdns_crowded = False  # said once that there were too many
        self._authenticated: set[str] = set()
        self._open_streams: Counter[tuple[str, str]] = Counter()
        self._sessions: dict[str, trio.CancelScope] = {}
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        self._unauthenticated_since: dict[str, float] = {}
        self._incarnation = time.time_ns() // 1_000_000
        self._seq = 0
        self.membership = Membership(self._make_advert(), trio.current_time())
        self._nursery: trio.Nursery | None = None
        admit(host, lambda peer: peer.to_base58() in self._authenticated)

    @property
    def mesh_id(self) -> str:
        return self.config.key.mesh_id

    def invite(self) -> str:
        return make_invite(self.config.key, self.addrs)

    # ---- own advert -------------------------------------------------------------

    def _make_advert(self, state: LocalState | None = None) -> Advert:
        state = state or self._local_state()
        self._seq += 1
        return Advert(
            peer_id=self.peer_id,
            incarnation=self._incarnation,
            seq=self._seq,
            name=self.config.name[:64],
            addrs=tuple(self.addrs),
            capacity=state.capacity,
            fragments=tuple(state.fragments),
            serving=tuple(state.serving),
            undeployed=tuple(state.undeployed),
            link=self._own_link(),
        ).signed(self._key_pair.private_key)

    def _own_link(self) -> dict[str, Any] | None:
        direct = self.direct
        if direct is None or direct.port is None:
            return None
        measured = direct.bandwidths()
        bandwidth = float(sorted(measured)[len(measured) // 2]) if measured else None
        return {"port": direct.port, "pin": direct.identity.pin, "bandwidth": bandwidth}

    def refresh(self) -> None:
        """Publish a new advert now (called on a timer and when local state changes)."""
        self.membership.set_own(self._make_advert(), trio.current_time())

    async def _refresh_loop(self) -> None:
        advertised_at = trio.current_time()
        while True:
            await trio.sleep(CAPACITY_PROBE_S)
            state = self._local_state()
            own = self.membership.own
            if (
                tuple(state.fragments) != own.fragments
                or tuple(state.serving) != own.serving
                or tuple(state.undeployed) != own.undeployed
                or capacity_changed(own.capacity, state.capacity)
                or trio.current_time() - advertised_at >= ADVERT_MAX_AGE_S
            ):
                self.membership.set_own(self._make_advert(state), trio.current_time())
                advertised_at = trio.current_time()

    # ---- what callers see -----------------------------------------------------

    def peers(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        rows = []
        for member in self.membership.members():
            advert = member.advert
            is_self = advert.peer_id == self.peer_id
            rows.append(
                {
                    "peer_id": advert.peer_id,
                    "short_id": short_id(advert.peer_id),
                    "name": advert.name,
                    "self": is_self,
                    "connected": is_self or advert.peer_id in self._sessions,
                    "addrs": list(advert.addrs),
                    "capacity": advert.capacity,
                    "fragments": list(advert.fragments),
                    "serving": list(advert.serving),
                    "undeployed": list(advert.undeployed),
                    "incarnation": advert.incarnation,
                    "seq": advert.seq,
                    "protocol": advert.protocol,
                    "compatible": advert.compatible,
                    "rtt_ms": member.rtt_ms,
                    "last_seen_s": round(now - member.last_seen, 3),
                    "link": None if is_self else self._link_row(advert.peer_id, member.rtt_ms),
                }
            )
        return sorted(rows, key=lambda r: (not r["self"], r["name"], r["peer_id"]))

    def _link_row(self, peer_id: str, rtt_ms: float | None) -> dict[str, Any]:
        """The path frames to a member take, with its measured RTT (ms) and bandwidth
        (bytes/s); the libp2p path's RTT is the membership exchange's."""
        if self.direct is None:
            return {
                "path": "libp2p",
                "rtt_ms": rtt_ms,
                "bandwidth": None,
                "reason": "direct links are off here (--no-link)",
            }
        row = self.direct.describe(peer_id)
        if row["path"] == "libp2p":
            row["rtt_ms"] = rtt_ms
        return row

    def _link_pins(self) -> dict[str, LinkAddress]:
        pins = {}
        for member in self.membership.members():
            advert = member.advert
            if advert.peer_id == self.peer_id or not advert.compatible:
                continue
            if not self.is_live(advert.peer_id):
                continue
            address = link_address(advert.addrs, advert.link, advert.incarnation)
            if address is not None:
                pins[advert.peer_id] = address
        return pins

    # ---- for the services built on the mesh ---------------------------------------

    def handle(
        self, protocol: TProtocol, handler: Callable[[str, INetStream], Awaitable[None]]
    ) -> None:
        """Serve ``protocol`` to members only; ``handler(peer_id, stream)`` may raise freely."""

        async def members_only(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            if peer not in self._authenticated:
                await self._reset(stream)
                return
            # py-libp2p buffers up to a 256 KiB window on every stream, read or not: a
            # member opening hundreds would fill memory outside any frame budget.
            slot = (peer, protocol)
            if self._open_streams[slot] >= STREAMS_PER_PEER:
                log.debug(
                    "refused a stream from %s: %d open on %s", peer[-8:], STREAMS_PER_PEER, protocol
                )
                await self._reset(stream)
                return
            self._open_streams[slot] += 1
            try:
                await handler(peer, stream)
            finally:
                self._open_streams[slot] -= 1
                if not self._open_streams[slot]:
                    del self._open_streams[slot]

        members_only.__name__ = f"handle {protocol}"
        self._host.set_stream_handler(protocol, self._guarded(members_only))

    async def open_stream(self, peer_id: str, protocol: TProtocol) -> INetStream:
        """A new stream to a member (within DIAL_TIMEOUT_S); raises MeshError otherwise."""
        if peer_id not in self._authenticated:
            raise MeshError(f"peer {short_id(peer_id)} is not a connected member")
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                return await self._host.new_stream(ID.from_base58(peer_id), [protocol])
        except Exception as exc:  # libp2p's stream failures, timeouts
            raise MeshError(f"cannot open {protocol} to {short_id(peer_id)}: {exc}") from exc

    def is_live(self, peer_id: str) -> bool:
        return peer_id == self.peer_id or (
            peer_id in self.membership and peer_id in self._authenticated
        )

    def unavailable_reason(self, peer_id: str) -> str | None:
        """Why the member's owner keeps it from new work (its advert says), or None."""
        member = self.membership.get(peer_id)
        if member is None or member.advert.capacity.get("available", True) is not False:
            return None
        return str(member.advert.capacity.get("unavailable_reason") or "unavailable")

    def takes_work(self, peer_id: str) -> bool:
        """Live, and its owner's policy lets it take new work."""
        return self.is_live(peer_id) and self.unavailable_reason(peer_id) is None

    # ---- adverts from others --------------------------------------------------

    def _take_adverts(self, wires: list[Any], via: str) -> None:
        now = trio.current_time()
        for wire in wires:
            try:
                advert = advert_from_wire(wire)
            except WireError as exc:
                dropped("exchange", f"an advert sent by {short_id(via)}: {exc}")
                continue
            change = self.membership.apply(advert, now, direct=advert.peer_id == via)
            if change is Change.FULL:
                dropped("exchange", f"{advert.peer_id}: the member table is full")
            if change in (Change.NEW, Change.RESTARTED):
                log.info(
                    "peer %s (%s) %s",
                    advert.peer_id[-8:],
                    advert.name,
                    "joined" if change is Change.NEW else "restarted",
                )
                self._learn_addrs(advert.peer_id, list(advert.addrs))

    def _learn_addrs(self, peer_id: str, addrs: list[str]) -> None:
        """Fresh addresses replace old ones; py-libp2p's 60 s dial block is lifted."""
        try:
            peer = ID.from_base58(peer_id)
            new = parse_multiaddrs(addrs, "peer address")
        except (MeshError, ValueError):
            return
        peerstore = self._host.get_peerstore()
        peerstore.clear_addrs(peer)
        peerstore.add_addrs(peer, new, 3600)
        unblock = getattr(self._host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(peer)
        self._retry_at.pop(peer_id, None)
        self._retry_delay.pop(peer_id, None)

    def found_by_mdns(self, peer_id: str, addrs: list[str]) -> None:
        """Dial a peer an mDNS record names (already checked by ``_discovered``).

        A record is unsigned: for a member, its signed advert's addresses stand, so a
        record cannot redirect us away from it. At most MAX_MDNS_TARGETS at once: a new
        find pushes out the oldest one that never passed the handshake, so a flood of
        records costs neither memory nor dial tasks without limit, and a real newcomer
        still gets its turn.
        """
        if peer_id == self.peer_id or self._targets.get(peer_id) == addrs:
            return
        if peer_id in self.membership:  # its signed advert outranks an unsigned record
            return
        if peer_id not in self._targets and len(self._mdns_found) >= MAX_MDNS_TARGETS:
            if not self._mdns_crowded:
                self._mdns_crowded = True
                log.warning(
                    "mDNS: more than %d peers found; dialing the newest (a flood on the LAN?)",
                    MAX_MDNS_TARGETS,
                )
            unproven = (p for p in self._mdns_found if p not in self._authenticated)
            oldest = next(unproven, None)
            if oldest is None:
                dropped("mdns", f"{peer_id}: already dialing {MAX_MDNS_TARGETS} found peers")
                return
            self._forget_target(oldest)
        self._targets[peer_id] = addrs
        self._mdns_found.pop(peer_id, None)
        self._mdns_found[peer_id] = None
        self._learn_addrs(peer_id, addrs)

    def lost_by_mdns(self, peer_id: str) -> None:
        if peer_id in self._mdns_found:  # bootstrap peers stay targets
            self._forget_target(peer_id)

    def _forget_target(self, peer_id: str) -> None:
        """Stop dialing an mDNS find; a member stays wanted through membership."""
        self._mdns_found.pop(peer_id, None)
        self._targets.pop(peer_id, None)
        if peer_id in self._authenticated or peer_id in self.membership:
            return
        scope = self._sessions.pop(peer_id, None)
        if scope is not None:
            scope.cancel()
        self._retry_at.pop(peer_id, None)
        self._retry_delay.pop(peer_id, None)
        try:
            self._host.get_peerstore().clear_addrs(ID.from_base58(peer_id))
        except Exception as exc:  # a peerstore that no longer knows it is fine
            log.debug("forgetting %s: %r", peer_id[-8:], exc)

    # ---- inbound streams ------------------------------------------------------

    async def _handle_auth(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            await _auth.verify_as_responder(
                stream,
                self.config.key,
                self._host.get_id(),
                peer,
                proven=lambda: self._authenticated.add(peer.to_base58()),
            )
        except AuthError as exc:
            log.info("refused %s: %s", peer.to_base58()[-8:], exc)
            await self._reset(stream)
            self._disconnect_soon(peer.to_base58())
            return
        with trio.move_on_after(DISCONNECT_TIMEOUT_S):
            await stream.close()

    async def _handle_sync(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        if peer not in self._authenticated:
            await self._reset(stream)
            return
        while True:
            request = await read_message(
                stream, _sync.SYNC, EXCHANGE_TIMEOUT_S + HEARTBEAT_S * 3, _sync.MAX_SYNC_FRAME
            )
            digest, adverts = _sync.parse_sync(request)
            self._take_adverts(adverts, via=peer)
            self.membership.heard_from(peer, trio.current_time())
            reply = _sync.sync_message(self.membership.digest(), self.membership.newer_than(digest))
            await write_message(stream, reply, EXCHANGE_TIMEOUT_S)

    def _guarded(self, handler: Callable[[INetStream], Any]) -> Callable[[INetStream], Any]:
        """A stream handler that can never raise into the host."""

        async def guarded(stream: INetStream) -> None:
            try:
                await handler(stream)
            except SchemaError as exc:  # tell the peer which field, then end the stream
                log.debug("stream %s refused: %s", handler.__name__, exc)
                with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                    try:
                        await write_message(stream, {"error": str(exc), "field": exc.field})
                        # FIN before RST: py-libp2p's Yamux drops buffered data on a reset
                        # unless the stream's receiving side was closed first.
                        await stream.close()
                    except Exception:  # the peer may be gone already
                        pass
                await self._reset(stream)
            except Exception as exc:  # any peer misbehaviour ends only this stream
                log.debug("stream %s ended: %r", handler.__name__, exc)
                await self._reset(stream)

        return guarded

    async def _reset(self, stream: INetStream) -> None:
        with trio.move_on_after(DISCONNECT_TIMEOUT_S):
            try:
                await stream.reset()
            except Exception:  # the stream may already be gone
                pass

    def _disconnect_soon(self, peer_id: str) -> None:
        async def disconnect() -> None:
            with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                try:
                    await self._host.disconnect(ID.from_base58(peer_id))
                except Exception as exc:  # already gone is fine
                    log.debug("disconnect %s: %r", peer_id[-8:], exc)

        if self._nursery is not None:
            self._nursery.start_soon(disconnect)

    # ---- outbound: one task per peer -------------------------------------------

    async def _peer_task(self, peer_id: str, scope: trio.CancelScope) -> None:
        """Dial, prove, exchange; whatever happens ends here (a retry is scheduled)."""
        with scope:
            try:
                peer = ID.from_base58(peer_id)  # checked before, and caught here regardless
                with trio.fail_after(DIAL_TIMEOUT_S):
                    if peer not in self._host.get_connected_peers():
                        addrs = self._host.get_peerstore().addrs(peer)
                        await self._host.connect(PeerInfo(peer, addrs))
                    stream = await self._host.new_stream(peer, [_auth.PROTOCOL])
                try:
                    await _auth.prove_as_dialer(stream, self.config.key, self._host.get_id(), peer)
                finally:
                    await self._reset(stream)
                self._authenticated.add(peer_id)
                self._retry_delay.pop(peer_id, None)
                await self._exchange_forever(peer)
            except AuthError as exc:
                log.info("%s", exc)
                self._disconnect_soon(peer_id)
                self._schedule_retry(peer_id, RETRY_MAX_S * 4)
            except Exception as exc:  # dial failures, resets, timeouts: retry later
                log.debug("peer %s: %r", peer_id[-8:], exc)
                self._schedule_retry(peer_id)
        if self._sessions.get(peer_id) is scope:
            del self._sessions[peer_id]

    def _schedule_retry(self, peer_id: str, delay: float | None = None) -> None:
        delay = delay or min(RETRY_MAX_S, self._retry_delay.get(peer_id, RETRY_MIN_S / 2) * 2)
        self._retry_delay[peer_id] = delay
        self._retry_at[peer_id] = trio.current_time() + delay

    async def _exchange_forever(self, peer: ID) -> None:
        peer_id = peer.to_base58()
        with trio.fail_after(DIAL_TIMEOUT_S):
            stream = await self._host.new_stream(peer, [_sync.PROTOCOL])
        their_digest: dict[str, tuple[int, int]] = {}
        try:
            while True:
                started = trio.current_time()
                message = _sync.sync_message(
                    self.membership.digest(), self.membership.newer_than(their_digest)
                )
                with trio.fail_after(EXCHANGE_TIMEOUT_S):
                    await write_message(stream, message)
                    reply = await read_message(
                        stream, _sync.SYNC, EXCHANGE_TIMEOUT_S, _sync.MAX_SYNC_FRAME
                    )
                now = trio.current_time()
                their_digest, adverts = _sync.parse_sync(reply)
                self._take_adverts(adverts, via=peer_id)
                self.membership.heard_from(peer_id, now, rtt_ms=round((now - started) * 1000, 3))
                await trio.sleep(HEARTBEAT_S)
        finally:
            await self._reset(stream)

    # ---- upkeep ------------------------------------------------------------------

    def _maintain(self, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        evicted = self.membership.evict_silent(now, SILENT_S)
        if evicted:
            # A newer advert of ours outranks the tombstone anyone may have made of us
            # meanwhile (after a freeze, everyone looked silent to us, and we to them).
            self.refresh()
        for peer_id in evicted:
            log.info("peer %s evicted: silent for %.0f s", peer_id[-8:], SILENT_S)
            self._authenticated.discard(peer_id)
            scope = self._sessions.pop(peer_id, None)
            if scope is not None:
                scope.cancel()
            self._disconnect_soon(peer_id)

        connected = {p.to_base58() for p in self._host.get_connected_peers()}
        for peer_id in connected - self._authenticated - set(self._sessions):
            since = self._unauthenticated_since.setdefault(peer_id, now)
            if now - since > AUTH_GRACE_S:
                log.info("dropping %s: no mesh handshake within %.0f s", peer_id[-8:], AUTH_GRACE_S)
                self._unauthenticated_since.pop(peer_id)
                self._disconnect_soon(peer_id)
        for peer_id in list(self._unauthenticated_since):
            if peer_id not in connected or peer_id in self._authenticated:
                del self._unauthenticated_since[peer_id]

        wanted = set(self._targets) | {m.advert.peer_id for m in self.membership.members()}
        wanted.discard(self.peer_id)
        for peer_id in set(self._retry_at) - wanted:  # peers we no longer want to dial
            self._retry_at.pop(peer_id)
            self._retry_delay.pop(peer_id, None)
        for peer_id in wanted - set(self._sessions):
            if self._retry_at.get(peer_id, 0.0) > now:
                continue
            if peer_id in self._targets and peer_id not in self.membership:
                self._learn_addrs(peer_id, self._targets[peer_id])
            scope = trio.CancelScope()
            self._sessions[peer_id] = scope
            nursery.start_soon(self._peer_task, peer_id, scope)

    async def _maintain_loop(self, nursery: trio.Nursery) -> None:
        while True:
            self._maintain(nursery)
            if self.direct is not None:
                self.direct.set_pins(self._link_pins())
            await trio.sleep(MAINTAIN_S)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._host.set_stream_handler(_auth.PROTOCOL, self._guarded(self._handle_auth))
        self._host.set_stream_handler(_sync.PROTOCOL, self._guarded(self._handle_sync))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.direct is not None:
                await nursery.start(self.direct.run)
            nursery.start_soon(self._refresh_loop)
            if self.config.mdns:
                await nursery.start(
                    lambda task_status: run_mdns(
                        mesh_id=self.mesh_id,
                        peer_id=self.peer_id,
                        addrs=self.addrs,
                        interfaces=self.interfaces,
                        found=self.found_by_mdns,
                        lost=self.lost_by_mdns,
                        task_status=task_status,
                    )
                )
            nursery.start_soon(self._maintain_loop, nursery)
            task_status.started()


@asynccontextmanager
async def open_mesh(
    key_pair: KeyPair, config: MeshConfig, local_state: LocalStateReader
) -> AsyncIterator[Mesh]:
    """Start this node's host and mesh membership; both stop when the block exits."""
    interfaces = select_interfaces(config.interfaces)  # settings errors surface before
    targets = settings_targets(config.peers)  # anything starts, as plain MeshErrors
    listen, binds = split_listen(config.listen)
    async with (
        open_host(key_pair, listen, frozenset({_auth.PROTOCOL})) as host,
        trio.open_nursery() as nursery,
    ):
        direct = None
        if config.link_dir is not None:
            peer_id = host.get_id().to_base58()
            identity = await trio.to_thread.run_sync(
                load_link_identity, config.link_dir, config.key.secret, peer_id
            )
            direct = DirectLinks(identity, binds)
            await direct.listen()
        mesh = Mesh(host, key_pair, config, local_state, interfaces, targets, direct)
        await nursery.start(mesh.run)
        try:
            yield mesh
        finally:
            nursery.cancel_scope.cancel()
