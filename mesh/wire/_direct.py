"""Direct links: TLS 1.3 over TCP between members, beside libp2p, with I/O in threads.

py-libp2p frames every byte in Python on the event loop (Noise, then Yamux); a hop costs
about 25 times a TLS socket's round trip. So frames (activations, tokens, training
tensors) go over one direct link per ordered pair of members instead, and libp2p keeps
identity, discovery, membership and control, and is the path of last resort.

- *Who may connect*: see ``_certs`` (mesh authority, then the pin of the named peer).
  A refused peer is closed before a byte of any frame is read or written.
- *Threads*: a dialed link has one sender thread (it writes frames, and pings to measure
  RTT and bandwidth); an accepted link has one receiver thread (it reads frames, leases
  their bytes from the node's budget, and answers pings). Each thread alone reads or
  writes its socket's TLS state at a time.
- *Hand-off*: senders queue at most SEND_QUEUE frames per link (a trio semaphore) and
  wait for their frame to be written, within the wire's frame deadline; receivers hand
  at most LINK_QUEUE frames to trio (a thread semaphore) and block beyond that, so a
  slow consumer fills TCP's window and the sender waits: the same backpressure as the
  libp2p path.
- *Fallback*: a peer that advertises no link, or whose link cannot be opened, is sent
  to over libp2p (``LinkDown``), and its link retried after a backoff.
"""

import hashlib
import logging
import math
import queue
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from .._errors import MeshError
from .._peerid import short_id
from . import _linkio
from ._budget import FrameBudget, GaveUp, Lease
from ._certs import LinkIdentity, fingerprint, peer_named

log = logging.getLogger(__name__)

SEND_QUEUE = 4
LINK_QUEUE = 4
SKIP_AT_MOST = 4  # an over-limit frame up to this many times the limit is read and dropped
DIAL_TIMEOUT_S = 3.0
HANDSHAKE_TIMEOUT_S = 5.0
POLL_S = 1.0  # how often a blocked link thread looks up to see whether to stop
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0  # a link that could not be opened is retried
PIN_WAIT_S = 5.0  # an authorised dialer's advert may trail its first dial by this
PROBE_EVERY_S = 30.0  # an idle link re-measures its RTT and bandwidth this often
PROBE_PINGS = 5
REGISTER_WAIT_S = 10.0  # services register their channels as the node starts
MAX_INBOUND = 256  # accepted links at once, authenticated or not
MAX_THREADS = 2 * MAX_INBOUND


class LinkDown(MeshError):
    """No direct link to that peer right now: send over libp2p."""


@dataclass(frozen=True)
class LinkAddress:
    """Where a member's direct link listens and which certificate it presents, from its
    signed advert."""

    hosts: tuple[str, ...]
    port: int
    pin: str


@dataclass
class LinkFrame:
    """A frame a direct link received: its msgpack header bytes, its payload size, the
    payload (None when it was over the channel's limit and skipped unread), and the
    bytes it holds in the node's budget (the handler's to release)."""

    body: bytes
    size: int
    payload: np.ndarray | None
    lease: Lease | None


FrameHandler = Callable[[str, LinkFrame], Awaitable[None]]


@dataclass(frozen=True)
class _Channel:
    handler: FrameHandler
    max_payload: int
    budget: FrameBudget


def channel_of(protocol: str) -> int:
    """A protocol's channel number on a link (0 and 1 are the link's ping and pong)."""
    return 2 + hashlib.sha256(protocol.encode()).digest()[0] % 254


@dataclass
class _Send:
    parts: list[bytes | memoryview]
    size: int
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None
    cancelled: bool = False


@dataclass
class _Measured:
    rtt_ms: float | None = None
    bandwidth: float | None = None  # bytes/s


class _Outbound:
    """One dialed link: its queue, its socket once open, and what it measured."""

    def __init__(self, peer_id: str, address: LinkAddress) -> None:
        self.peer_id = peer_id
        self.address = address
        self.queue: queue.Queue[_Send | None] = queue.Queue()
        self.slots = trio.Semaphore(SEND_QUEUE)
        self.conn: ssl.SSLSocket | None = None
        self.open = False
        self.broken: str | None = None
        self.closing = threading.Event()
        self.measured = _Measured()

    def close(self) -> None:
        self.closing.set()
        self.queue.put(None)
        if self.conn is not None:
            _linkio.shutdown(self.conn)


class DirectLinks:
    """This node's direct links: the listeners, one dialed link per member, the links
    members dialed to us, and what each measured."""

    def __init__(self, identity: LinkIdentity, binds: list[tuple[str, int]]) -> None:
        self.identity = identity
        self.port: int | None = None  # once listening
        self._binds = binds
        self._listeners: list[trio.socket.SocketType] = []
        self._pins: dict[str, LinkAddress] = {}  # replaced whole; threads read it
        self._channels: dict[int, _Channel] = {}
        self._out: dict[str, _Outbound] = {}
        self._inbound: dict[str, ssl.SSLSocket] = {}
        self._inbound_lock = threading.Lock()
        self._unavailable: dict[str, tuple[float, str]] = {}  # peer -> (retry at, why)
        self._backoff: dict[str, float] = {}  # peer -> seconds until its next dial
        self._fallback_rate: dict[str, float] = {}  # peer -> bytes/s seen over libp2p
        self._threads = trio.CapacityLimiter(MAX_THREADS)
        self._accepting = trio.Semaphore(MAX_INBOUND)
        self._stopping = threading.Event()
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    # ---- what the services and the mesh use ------------------------------------------

    def handle(
        self, protocol: str, handler: FrameHandler, max_payload: int, budget: FrameBudget
    ) -> None:
        """Frames of ``protocol`` from members go to ``handler(peer_id, frame)``; payloads
        over ``max_payload`` arrive as None, and every payload is leased from ``budget``."""
        channel = channel_of(protocol)
        if channel in self._channels:
            raise ValueError(f"{protocol} shares channel {channel} with another protocol")
        self._channels[channel] = _Channel(handler, max_payload, budget)

    def set_pins(self, pins: dict[str, LinkAddress]) -> None:
        """The members we may link with, and how: dial new ones at once (so the first
        frame does not wait for a handshake), and close links of those gone or changed."""
        old, self._pins = self._pins, dict(pins)
        for peer_id, address in old.items():
            if pins.get(peer_id) != address:
                self._drop(peer_id)
        for peer_id in pins:
            if peer_id not in self._out:
                self._dial(peer_id)

    def _drop(self, peer_id: str) -> None:
        out = self._out.pop(peer_id, None)
        if out is not None:
            out.close()
        self._unavailable.pop(peer_id, None)
        self._backoff.pop(peer_id, None)
        self._fallback_rate.pop(peer_id, None)
        with self._inbound_lock:
            conn = self._inbound.pop(peer_id, None)
        if conn is not None:
            _linkio.shutdown(conn)

    def _dial(self, peer_id: str) -> _Outbound | None:
        address = self._pins.get(peer_id)
        if address is None or self._nursery is None:
            return None
        retry = self._unavailable.get(peer_id)
        if retry is not None and retry[0] > trio.current_time():
            return None
        out = _Outbound(peer_id, address)
        self._out[peer_id] = out
        self._nursery.start_soon(self._run_outbound, out)
        return out

    async def send(
        self, peer_id: str, protocol: str, head: bytes, views: list[memoryview], timeout: float
    ) -> None:
        """Write one frame to ``peer_id`` over its direct link, within ``timeout``.

        LinkDown when there is no open link (the caller sends over libp2p instead);
        trio.TooSlowError when the frame did not leave in time (the link is closed: a
        peer that stops reading is frozen or gone, and libp2p would not fare better).
        """
        out = self._out.get(peer_id)
        if out is None or out.broken is not None:
            if out is not None:
                self._out.pop(peer_id, None)
            out = self._dial(peer_id)
        if out is None:
            raise LinkDown(self.why_not(peer_id))
        item = _Send(_linkio.frame_parts(channel_of(protocol), head, views), 0)
        item.size = sum(len(v) for v in views)
        try:
            with trio.fail_after(timeout):
                async with out.slots:
                    out.queue.put(item)
                    if out.broken is not None and not item.done.is_set():
                        raise LinkDown(out.broken)  # its thread ended before taking it
                    await item.done.wait()
        except trio.TooSlowError:
            out.broken = f"a frame of {item.size} bytes did not leave within {timeout:.0f} s"
            out.close()
            raise
        except BaseException:
            item.cancelled = True  # a frame not yet begun is skipped
            raise
        if item.error is not None:
            raise LinkDown(item.error)

    def why_not(self, peer_id: str) -> str:
        if peer_id not in self._pins:
            return f"{short_id(peer_id)} advertises no direct link"
        found = self._unavailable.get(peer_id)
        return found[1] if found else f"the link to {short_id(peer_id)} is not open"

    def observe_fallback(self, peer_id: str, size: int, seconds: float) -> None:
        """A big frame's write over libp2p: the fallback path's bandwidth, as measured."""
        if seconds > 0:
            rate = size / seconds
            old = self._fallback_rate.get(peer_id)
            self._fallback_rate[peer_id] = rate if old is None else 0.7 * old + 0.3 * rate

    def describe(self, peer_id: str) -> dict[str, Any]:
        """The path frames to ``peer_id`` take and what it measured (RTT in ms and
        bandwidth in bytes/s; for the libp2p path the caller knows the RTT)."""
        out = self._out.get(peer_id)
        if out is not None and out.open and out.broken is None:
            return {
                "path": "direct",
                "rtt_ms": out.measured.rtt_ms,
                "bandwidth": out.measured.bandwidth,
            }
        if out is not None and out.broken is None and peer_id not in self._unavailable:
            return {"path": "opening", "rtt_ms": None, "bandwidth": None}
        return {
            "path": "libp2p",
            "rtt_ms": None,
            "bandwidth": self._fallback_rate.get(peer_id),
            "reason": self.why_not(peer_id),
        }

    def bandwidths(self) -> list[float]:
        """Bandwidth each open direct link measured, bytes/s."""
        return [
            o.measured.bandwidth
            for o in self._out.values()
            if o.open and o.measured.bandwidth is not None
        ]

    # ---- lifetime --------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and dial links until cancelled (``listen`` first, to have a port)."""
        listeners = self._listeners
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)
                for peer_id in self._pins:
                    self._dial(peer_id)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stopping.set()
            for out in self._out.values():
                out.close()
            with self._inbound_lock:
                for conn in self._inbound.values():
                    _linkio.shutdown(conn)
            for listener in listeners:
                listener.close()

    async def listen(self) -> None:
        """Bind every listen host to one port (the first bind picks it when 0). A bind
        that fails leaves the node without a link there; peers then use libp2p."""
        listeners = []
        port = None
        for host, wanted in self._binds:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                await sock.bind((host, port if port is not None else wanted))
                sock.listen(64)
            except OSError as exc:
                log.warning(
                    "no direct link on %s:%s (%s); peers will use libp2p", host, wanted, exc
                )
                sock.close()
                continue
            port = sock.getsockname()[1]
            listeners.append(sock)
        self.port = port
        self._listeners = listeners

    async def _accept_loop(self, listener: trio.socket.SocketType) -> None:
        assert self._nursery is not None
        while True:
            conn, _ = await listener.accept()
            if self._accepting.value == 0:
                conn.close()  # a flood of connections: the newest waits for its turn
                continue
            plain = socket.socket(fileno=conn.detach())
            self._nursery.start_soon(self._run_inbound, plain)

    # ---- accepted links ----------------------------------------------------------

    async def _run_inbound(self, conn: socket.socket) -> None:
        send, receive = trio.open_memory_channel[tuple[int, LinkFrame]](math.inf)
        slots = threading.Semaphore(LINK_QUEUE)  # what really bounds the channel
        peer: list[str] = []
        async with self._accepting, trio.open_nursery() as nursery:
            nursery.start_soon(self._consume, receive, slots, peer)
            async with send:
                try:
                    await trio.to_thread.run_sync(
                        self._receive,
                        conn,
                        send,
                        slots,
                        peer,
                        limiter=self._threads,
                        abandon_on_cancel=True,  # type: ignore[call-arg]  # stale trio-stubs
                    )
                finally:
                    _linkio.shutdown(conn)

    async def _consume(
        self,
        receive: trio.MemoryReceiveChannel[tuple[int, LinkFrame]],
        slots: threading.Semaphore,
        peer: list[str],
    ) -> None:
        async with receive:
            async for channel, frame in receive:
                slots.release()
                try:
                    await self._channels[channel].handler(peer[0], frame)
                except Exception as exc:  # a handler's failure ends only this frame
                    log.debug("a frame from %s failed: %r", short_id(peer[0]), exc)
                    if frame.lease is not None:
                        frame.lease.release()

    def _stopped(self) -> bool:
        return self._stopping.is_set()

    def _receive(
        self,
        conn: socket.socket,
        send: trio.MemorySendChannel[tuple[int, LinkFrame]],
        slots: threading.Semaphore,
        peer: list[str],
    ) -> None:
        """The receiver thread of an accepted link: handshake, check the pin, then
        read frames until the link ends."""
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            tls = self.identity.server.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as exc:  # strangers end here, inside OpenSSL
            log.info("refused a direct link from %s: %s", _remote(conn), exc)
            conn.close()
            return
        der = tls.getpeercert(binary_form=True) or b""
        named = peer_named(der)
        if named is None or not self._pinned(named, fingerprint(der)):
            log.info(
                "refused a direct link from %s: its certificate is not %s's pin",
                _remote(tls),
                short_id(named) if named else "any member",
            )
            tls.close()
            return
        assert named is not None
        peer.append(named)
        with self._inbound_lock:
            previous, self._inbound[named] = self._inbound.get(named), tls
        if previous is not None:
            _linkio.shutdown(previous)  # the peer redialed: its old link is dead to it
        tls.settimeout(POLL_S)
        try:
            self._read_frames(tls, named, send, slots)
        except (_linkio.LinkClosed, GaveUp) as exc:
            log.debug("direct link from %s ended: %s", short_id(named), exc)
        finally:
            with self._inbound_lock:
                if self._inbound.get(named) is tls:
                    del self._inbound[named]
            tls.close()

    def _pinned(self, peer_id: str, pin: str) -> bool:
        """Whether ``pin`` is ``peer_id``'s pin. The certificate passed the mesh
        authority, so a member may be dialing before its advert reaches us: its pin
        gets PIN_WAIT_S to arrive. Nothing is read from the link meanwhile."""
        deadline = time.monotonic() + PIN_WAIT_S
        while True:
            address = self._pins.get(peer_id)
            if address is not None:
                return address.pin == pin
            if time.monotonic() > deadline or self._stopped():
                return False
            time.sleep(0.1)

    def _read_frames(
        self,
        tls: ssl.SSLSocket,
        peer_id: str,
        send: trio.MemorySendChannel[tuple[int, LinkFrame]],
        slots: threading.Semaphore,
    ) -> None:
        stopped = self._stopped
        assert self._token is not None
        while True:
            channel, size, body = _linkio.read_prefix(tls, stopped)
            if channel == _linkio.PING:
                _linkio.answer_ping(tls, size, stopped)
                continue
            spec = self._channel(channel)
            if size > spec.max_payload:
                if size > SKIP_AT_MOST * spec.max_payload:
                    raise _linkio.LinkClosed(f"a frame of {size} bytes is not worth reading")
                _linkio.skip(tls, size, stopped)
                frame = LinkFrame(body, size, None, None)
            else:
                lease = spec.budget.lease_blocking(peer_id, size, stopped) if size else None
                try:
                    payload = _linkio.read_payload(tls, size, stopped)
                except BaseException:
                    if lease is not None:
                        self._token.run_sync_soon(lease.release)
                    raise
                frame = LinkFrame(body, size, payload, lease)
            while not slots.acquire(timeout=POLL_S):
                if stopped():
                    raise _linkio.LinkClosed("shut down")
            self._token.run_sync_soon(_hand_over, send, channel, frame)

    def _channel(self, channel: int) -> _Channel:
        """A channel's handler; one a node is still starting gets REGISTER_WAIT_S."""
        deadline = time.monotonic() + REGISTER_WAIT_S
        while (spec := self._channels.get(channel)) is None:
            if time.monotonic() > deadline or self._stopped():
                raise _linkio.LinkClosed(f"a frame on unknown channel {channel}")
            time.sleep(0.05)
        return spec

    # ---- dialed links ------------------------------------------------------------

    async def _run_outbound(self, out: _Outbound) -> None:
        try:
            await trio.to_thread.run_sync(
                self._send_loop,
                out,
                limiter=self._threads,
                abandon_on_cancel=True,  # type: ignore[call-arg]  # stale trio-stubs
            )
        finally:
            out.close()
            if self._out.get(out.peer_id) is out and out.broken is None:
                out.broken = "closed"

    def _unavailable_now(self, out: _Outbound, why: str) -> None:
        """Called on trio's thread: frames to this peer take libp2p for a while (which
        doubles, up to RETRY_MAX_S, while dials keep failing)."""
        if self._pins.get(out.peer_id) == out.address:
            delay = self._backoff.get(out.peer_id, RETRY_MIN_S)
            self._backoff[out.peer_id] = min(RETRY_MAX_S, delay * 2)
            self._unavailable[out.peer_id] = (trio.current_time() + delay, why)
        if self._out.get(out.peer_id) is out:
            del self._out[out.peer_id]

    def _send_loop(self, out: _Outbound) -> None:
        """The sender thread of a dialed link: dial, check the pin, measure, then write
        frames until the link ends; frames it could not write fail with the reason."""
        assert self._token is not None
        try:
            out.conn = self._open(out)
        except (_linkio.LinkClosed, OSError, ssl.SSLError) as exc:
            why = f"cannot open a direct link to {short_id(out.peer_id)}: {exc}"
            log.info("%s; using libp2p", why)
            self._token.run_sync_soon(self._unavailable_now, out, why)
            self._fail_queued(out, why)
            return
        out.open = True
        self._token.run_sync_soon(self._backoff.pop, out.peer_id, None)
        try:
            self._measure(out)
            while True:
                try:
                    item = out.queue.get(timeout=PROBE_EVERY_S)
                except queue.Empty:
                    self._measure(out)
                    continue
                if item is None or out.closing.is_set():
                    if item is not None:
                        self._finish(item, "the link was closed")
                    break
                if item.cancelled:
                    self._finish(item, None)
                    continue
                try:
                    _linkio.send_all(out.conn, item.parts)
                except _linkio.LinkClosed as exc:
                    self._finish(item, f"the direct link to {short_id(out.peer_id)} {exc}")
                    raise
                self._finish(item, None)
        except _linkio.LinkClosed as exc:
            out.broken = str(exc)
            log.debug("direct link to %s ended: %s", short_id(out.peer_id), exc)
        finally:
            out.broken = out.broken or "closed"
            self._fail_queued(out, out.broken)
            out.conn.close()

    def _open(self, out: _Outbound) -> ssl.SSLSocket:
        last: Exception = _linkio.LinkClosed("no address")
        for host in out.address.hosts:
            try:
                conn = socket.create_connection((host, out.address.port), DIAL_TIMEOUT_S)
            except OSError as exc:
                last = exc
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                tls = self.identity.client.wrap_socket(conn)
            except BaseException:
                conn.close()
                raise
            der = tls.getpeercert(binary_form=True) or b""
            if fingerprint(der) != out.address.pin or peer_named(der) != out.peer_id:
                tls.close()  # someone else listens there: not a byte of any frame for it
                raise _linkio.LinkClosed(
                    f"{host}:{out.address.port} presents another certificate than "
                    f"{short_id(out.peer_id)}'s pin"
                )
            tls.settimeout(_linkio.STALL_S)
            return tls
        raise last

    def _measure(self, out: _Outbound) -> None:
        assert out.conn is not None
        pings = [_linkio.probe(out.conn, 16, self._stopped) for _ in range(PROBE_PINGS)]
        rtt = statistics.median(pings)
        bulk = _linkio.probe(out.conn, _linkio.MAX_PROBE, self._stopped)
        out.measured = _Measured(round(rtt * 1000, 3), _linkio.MAX_PROBE / max(bulk - rtt, 1e-6))

    def _finish(self, item: _Send, error: str | None) -> None:
        item.error = error
        assert self._token is not None
        try:
            self._token.run_sync_soon(item.done.set)
        except trio.RunFinishedError:
            pass

    def _fail_queued(self, out: _Outbound, why: str) -> None:
        while True:
            try:
                item = out.queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._finish(item, why)


def _hand_over(
    send: trio.MemorySendChannel[tuple[int, LinkFrame]], channel: int, frame: LinkFrame
) -> None:
    """On trio's thread: queue a received frame for its consumer (or drop it, with its
    lease, when the link's consumer is gone)."""
    try:
        send.send_nowait((channel, frame))
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        if frame.lease is not None:
            frame.lease.release()


def _remote(conn: socket.socket) -> str:
    try:
        host, port = conn.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a closed socket"
