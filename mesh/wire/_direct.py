"""Direct links: TLS 1.3 over TCP between members, beside libp2p.

py-libp2p frames every byte in Python on the event loop (Noise, then Yamux); a hop costs
about 25 times a TLS socket's round trip. So frames (activations, tokens, training
tensors) go over one direct link per ordered pair of members instead, and libp2p keeps
identity, discovery, membership and control, and is the path of last resort.

- *Who may connect*: see ``_certs`` (mesh authority, then the pin of the named peer).
  A refused peer is closed before a byte of any frame is read or written.
- *Who moves the bytes*: OpenSSL, in C with the GIL released, on a non-blocking socket
  (see ``_linkio``). Frames up to INLINE_MAX go from trio's thread; bigger payloads go
  in a worker thread, so megabytes never hold the event loop. Handing every frame to a
  thread, as first built, cost a thread wake per hand-off (about 50 µs here, as much
  as a whole TLS round trip): 7x the TLS floor for small frames.
- *Order and backpressure*: one writer at a time per dialed link (a lock, held for a
  whole frame, within the wire's frame deadline); one reader per accepted link, which
  leases a frame's bytes from the node's budget before reading its payload, and awaits
  the frame's handler before reading the next. A slow consumer fills TCP's window and
  the sender waits: the same backpressure as the libp2p path.
- *Fallback*: a peer that advertises no link, or whose link cannot be opened, is sent
  to over libp2p (``LinkDown``), and its link is retried after a backoff.
"""

import hashlib
import logging
import math
import socket
import ssl
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from .._errors import MeshError, WireError
from .._peerid import short_id
from . import _linkio
from ._budget import FrameBudget, Lease
from ._certs import LinkIdentity, fingerprint, peer_named
from ._frames import decode_payload, frame_timeout, parse_header
from ._schema import Check, SchemaError

log = logging.getLogger(__name__)

INLINE_MAX = 256 << 10  # payloads up to this size move on trio's thread
SMALL = 64 << 10  # frames up to this size leave in one write
SKIP_AT_MOST = 4  # an over-limit frame up to this many times the limit is read and dropped
DIAL_TIMEOUT_S = 3.0
HANDSHAKE_TIMEOUT_S = 2.0
OPEN_WAIT_S = 1.0  # a frame waits this long for a link still opening, then takes libp2p
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0  # a link that could not be opened is retried
PIN_WAIT_S = 5.0  # an authorised dialer's advert may trail its first dial by this
REGISTER_WAIT_S = 10.0  # services register their channels as the node starts
PROBE_EVERY_S = 30.0  # a link re-measures its RTT this often
BULK_EVERY_S = 300.0  # and its bandwidth (a bulk ping) this often
PROBE_PINGS = 5
PROBE_BULK = 256 << 10
PONG_TIMEOUT_S = 10.0  # a busy peer answers late: the sample is skipped, the link kept
MAX_BANDWIDTH = 1e11  # bytes/s; what an advert may carry
PINGS_PER_S = 50  # a member pinging faster than this loses its link
MAX_INBOUND = 256  # accepted links at once, authenticated or not


class LinkDown(MeshError):
    """No direct link to that peer right now: send over libp2p."""


@dataclass(frozen=True)
class LinkAddress:
    """Where a member's direct link listens and which certificate it presents, from its
    signed advert."""

    hosts: tuple[str, ...]
    port: int
    pin: str
    incarnation: int = 0  # a restarted peer is dialed afresh, even on the same port


@dataclass
class LinkFrame:
    """A frame a direct link received: its msgpack header bytes, its payload size, the
    payload (None when it was over the channel's limit and skipped unread), and the
    bytes it holds in the node's budget (the handler's to release)."""

    body: bytes
    size: int
    payload: np.ndarray | None
    lease: Lease | None

    def header(self, schema: Check) -> dict[str, Any]:
        """The header as ``schema`` admits it, its part sizes those of the payload read;
        SchemaError (or WireError: not msgpack) says what is wrong, and the frame's
        lease is released."""
        try:
            header, size = parse_header(self.body, schema)
            if size != self.size:
                raise SchemaError("tensors", f"announce {size} bytes, the frame holds {self.size}")
        except WireError:
            self.release()
            raise
        return header

    def tensors(self, header: dict[str, Any]) -> dict[str, np.ndarray]:
        """The payload's tensors, views into it; WireError (and the lease released) when
        a codec cannot decode one."""
        assert self.payload is not None, "a skipped frame has no tensors"
        try:
            return decode_payload(header, self.payload)
        except WireError:
            self.release()
            raise

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


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
class _Measured:
    rtt_ms: float | None = None
    bandwidth: float | None = None  # bytes/s


@dataclass
class _Outbound:
    """One dialed link: its socket once open, its writer lock, what it measured."""

    peer_id: str
    address: LinkAddress
    conn: ssl.SSLSocket | None = None
    opened: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)
    broken: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    measured: _Measured = field(default_factory=_Measured)
    reader: _linkio.Reader | None = None  # pongs and the peer's close, read under the lock
    close_when_free: bool = False
    pong: trio.Event | None = None  # set by the reader when the ping in flight is answered
    pong_seq: int = 0  # the number of the ping in flight (pongs echo it)
    pong_at: float = 0.0  # when the reader woke to the answer (perf_counter)

    @property
    def usable(self) -> bool:
        return self.conn is not None and self.broken is None

    def end(self, why: str) -> None:
        """Stop using this link: wake whoever waits on it; its task closes the socket."""
        self.broken = self.broken or why
        self.stop.set()
        if self.conn is not None:
            _linkio.shutdown(self.conn)
        self.scope.cancel()


class DirectLinks:
    """This node's direct links: the listeners, one dialed link per member, the links
    members dialed to us, and what each measured."""

    def __init__(self, identity: LinkIdentity, binds: list[tuple[str, int]]) -> None:
        self.identity = identity
        self.port: int | None = None  # once listening
        self._binds = binds
        self._listeners: list[trio.socket.SocketType] = []
        self._pins: dict[str, LinkAddress] = {}
        self._channels: dict[int, _Channel] = {}
        self._registered = trio.Event()
        self._out: dict[str, _Outbound] = {}
        self._inbound: dict[str, list[tuple[ssl.SSLSocket, trio.CancelScope]]] = {}
        self._sent: Counter[tuple[str, str]] = Counter()  # (peer, path) -> frames
        self._unavailable: dict[str, tuple[float, str]] = {}  # peer -> (retry at, why)
        self._backoff: dict[str, float] = {}  # peer -> seconds until its next dial
        self._fallback_rate: dict[str, float] = {}  # peer -> bytes/s seen over libp2p
        self._accepting = trio.Semaphore(MAX_INBOUND)
        # Big payloads moving at once, each way: a node whose sends are held back by
        # backpressure must still be able to read what its peers send it.
        self._send_threads = trio.CapacityLimiter(8)
        self._recv_threads = trio.CapacityLimiter(8)
        self._stopping = threading.Event()
        self._nursery: trio.Nursery | None = None

    # ---- what the services and the mesh use ------------------------------------------

    def handle(
        self, protocol: str, handler: FrameHandler, max_payload: int, budget: FrameBudget
    ) -> None:
        """Frames of ``protocol`` from members go to ``handler(peer_id, frame)``; payloads
        over ``max_payload`` arrive as None, and every payload is leased from ``budget``."""
        channel = channel_of(protocol)
        if max_payload > budget.per_peer:
            raise ValueError(f"{protocol}: a frame of {max_payload} bytes could never be leased")
        if channel in self._channels:
            raise ValueError(f"{protocol} shares channel {channel} with another protocol")
        self._channels[channel] = _Channel(handler, max_payload, budget)

    def set_pins(self, pins: dict[str, LinkAddress]) -> None:
        """The members we may link with, and how: dial new ones at once (so the first
        frame does not wait for a handshake), and close links of those gone or changed."""
        old, self._pins = self._pins, dict(pins)
        for peer_id, address in old.items():
            new = pins.get(peer_id)
            if new is None or new.pin != address.pin:
                self._drop(peer_id)  # gone, or another certificate: its links too
            elif new != address:  # restarted, or moved: dial it afresh
                self._redial(peer_id)
        for peer_id in pins:
            out = self._out.get(peer_id)
            if out is None or out.broken is not None:
                self._dial(peer_id)

    def _drop(self, peer_id: str) -> None:
        out = self._out.pop(peer_id, None)
        if out is not None:
            out.end("the peer left or changed its link")
        for table in (self._unavailable, self._backoff, self._fallback_rate):
            table.pop(peer_id, None)
        for conn, scope in self._inbound.pop(peer_id, []):
            _linkio.shutdown(conn)
            scope.cancel()

    def _redial(self, peer_id: str) -> None:
        out = self._out.pop(peer_id, None)
        if out is not None:
            out.end("the peer restarted or moved")
        self._unavailable.pop(peer_id, None)
        self._backoff.pop(peer_id, None)

    def _dial(self, peer_id: str) -> _Outbound | None:
        address = self._pins.get(peer_id)
        if address is None or self._nursery is None:
            return None
        retry = self._unavailable.get(peer_id)
        if retry is not None and retry[0] > trio.current_time():
            return None
        self._unavailable.pop(peer_id, None)
        out = _Outbound(peer_id, address)
        self._out[peer_id] = out
        self._nursery.start_soon(self._keep_outbound, out)
        return out

    async def send(
        self, peer_id: str, protocol: str, head: bytes, views: list[memoryview], timeout: float
    ) -> None:
        """Write one frame to ``peer_id`` over its direct link, within ``timeout``.

        LinkDown when there is no open link, or it broke before this frame began (the
        caller sends over libp2p instead); trio.TooSlowError when the frame did not
        leave in time (the link is closed: a peer that stops reading is frozen or gone,
        and libp2p would not fare better).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        out = self._out.get(peer_id)
        if out is None or out.broken is not None:
            out = self._dial(peer_id)
        if out is None:
            raise LinkDown(self.why_not(peer_id))
        if not out.opened.is_set():
            with trio.move_on_after(OPEN_WAIT_S):
                await out.opened.wait()
        if not out.usable or not out.opened.is_set():
            raise LinkDown(out.broken or self.why_not(peer_id))
        size = sum(len(v) for v in views)
        parts = _linkio.frame_parts(channel_of(protocol), head, views)
        deadline = trio.current_time() + timeout
        began = False
        try:
            with trio.fail_at(deadline):
                async with _held(out.lock, out):
                    conn = out.conn
                    if not out.usable or conn is None:
                        raise LinkDown(out.broken or "closed")
                    began = True
                    if size + len(head) <= SMALL:
                        await _linkio.send_inline(conn, b"".join(parts))
                    elif size <= INLINE_MAX:
                        for part in parts:
                            await _linkio.send_inline(conn, part)
                    else:
                        await _linkio.send_inline(conn, b"".join(parts[:2]))
                        await self._in_thread(
                            _linkio.send_blocking, conn, list(views), out.stop, deadline, True
                        )
        except _linkio.LinkClosed as exc:
            out.end(str(exc))
            raise LinkDown(f"the direct link to {short_id(peer_id)} {exc}") from exc
        except BaseException:
            if began:  # part of a frame is on the wire: the link cannot go on
                out.end("a frame was abandoned half-written")
            raise
        self.count(peer_id, "direct")

    def count(self, peer_id: str, path: str) -> None:
        """One more frame sent to ``peer_id`` over ``path`` ("direct" or "libp2p")."""
        self._sent[(peer_id, path)] += 1

    async def _in_thread(
        self,
        work: Callable[[ssl.SSLSocket, Any, Callable[[], bool]], Any],
        conn: ssl.SSLSocket,
        arg: Any,
        stop: threading.Event,
        deadline: float,
        sending: bool = False,
    ) -> Any:
        """A big payload's I/O in a worker thread. The thread gives up at the deadline
        (counted from now, not from when a thread is free), or when the link or the
        node stops, so waiting for it is bounded."""
        until = time.monotonic() + max(0.0, deadline - trio.current_time())

        def stopped() -> bool:
            return stop.is_set() or self._stopping.is_set()

        limiter = self._send_threads if sending else self._recv_threads
        result = await trio.to_thread.run_sync(
            _with_deadline, work, conn, arg, stopped, until, limiter=limiter
        )
        if isinstance(result, _Late):
            raise trio.TooSlowError("a payload did not move before its deadline")
        return result

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
        frames = {p: self._sent[(peer_id, p)] for p in ("direct", "libp2p")}
        if out is not None and out.usable and out.opened.is_set():
            return {
                "path": "direct",
                "rtt_ms": out.measured.rtt_ms,
                "bandwidth": out.measured.bandwidth,
                "frames": frames,
            }
        if out is not None and out.broken is None:
            return {"path": "opening", "rtt_ms": None, "bandwidth": None, "frames": frames}
        return {
            "path": "libp2p",
            "rtt_ms": None,
            "bandwidth": self._fallback_rate.get(peer_id),
            "reason": self.why_not(peer_id),
            "frames": frames,
        }

    def bandwidths(self) -> list[float]:
        """Bandwidth each open direct link measured, bytes/s."""
        return [
            o.measured.bandwidth
            for o in self._out.values()
            if o.usable and o.measured.bandwidth is not None
        ]

    # ---- lifetime --------------------------------------------------------------------

    async def listen(self) -> None:
        """Bind every listen host to one port (the first bind picks it when 0). A bind
        that fails leaves the node without a link there; peers then use libp2p."""
        port = None
        for host, wanted in self._binds:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                await sock.bind((host, port if port is not None else wanted))
                sock.listen(64)
            except OSError as exc:
                log.warning("no direct link on %s:%s (%s); peers use libp2p", host, wanted, exc)
                sock.close()
                continue
            port = sock.getsockname()[1]
            self._listeners.append(sock)
        self.port = port

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and dial links until cancelled (``listen`` first, to have a port)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in self._listeners:
                    nursery.start_soon(self._accept_loop, listener)
                for peer_id in self._pins:
                    self._dial(peer_id)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:  # before the nursery waits: wake worker threads so they end
                    self._stopping.set()
                    for out in self._out.values():
                        out.end("the node is stopping")
                    for links in self._inbound.values():
                        for conn, _ in links:
                            _linkio.shutdown(conn)
        finally:
            for listener in self._listeners:
                listener.close()

    async def _accept_loop(self, listener: trio.socket.SocketType) -> None:
        assert self._nursery is not None
        while True:
            await self._accepting.acquire()  # when all are taken, dials wait in the backlog
            try:
                conn, _ = await listener.accept()
            except OSError as exc:  # out of descriptors or memory, or a network error
                self._accepting.release()
                log.warning("direct links: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            plain = socket.socket(fileno=conn.detach())
            self._nursery.start_soon(self._run_inbound, plain)

    # ---- accepted links ----------------------------------------------------------

    async def _run_inbound(self, conn: socket.socket) -> None:
        """An accepted link (it holds one of the MAX_INBOUND slots): admit its peer, say
        so, then read its frames. A link the peer dialed again is not cut short: it
        reads on until the peer closes it, so no frame already sent is lost."""
        try:
            try:
                conn.setblocking(False)
                # Already reset? CPython's wrap_socket would then fail half-way and
                # leave its own socket object unclosed.
                conn.getpeername()
                tls = self.identity.server.wrap_socket(
                    conn, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ssl.SSLError) as exc:  # a connect-and-reset, say
                log.info("refused a direct link from %s: %s", _remote(conn), exc)
                conn.close()
                return
            try:
                peer_id = await self._admit(tls)
                if peer_id is None:
                    return
                entry = (tls, trio.CancelScope())
                self._inbound.setdefault(peer_id, []).append(entry)
                with entry[1]:
                    try:
                        with trio.fail_after(_linkio.STALL_S):  # the welcome
                            await _linkio.send_inline(tls, _linkio.PREFIX.pack(_linkio.PONG, 0, 0))
                        await self._read_frames(tls, peer_id)
                    except (_linkio.LinkClosed, trio.TooSlowError) as exc:
                        log.debug("direct link from %s ended: %s", short_id(peer_id), exc)
                    except Exception as exc:  # whatever a peer does ends only its link
                        log.warning("direct link from %s failed: %r", short_id(peer_id), exc)
                links = self._inbound.get(peer_id, [])
                if entry in links:
                    links.remove(entry)
                    if not links:
                        del self._inbound[peer_id]
            finally:
                tls.close()
        finally:
            self._accepting.release()

    async def _admit(self, tls: ssl.SSLSocket) -> str | None:
        """Handshake, then the pin: the peer id of a member, or None (and not a byte of
        a frame is read). The certificate passed the mesh authority, so a member may be
        dialing before its advert reaches us: its pin gets PIN_WAIT_S to arrive."""
        remote = _remote(tls)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await _handshake(tls)
        except (OSError, ssl.SSLError, trio.TooSlowError) as exc:  # strangers end here
            log.info("refused a direct link from %s: %s", remote, exc)
            return None
        der = tls.getpeercert(binary_form=True) or b""
        named = peer_named(der)
        with trio.move_on_after(PIN_WAIT_S):
            while named is not None and named not in self._pins:
                await trio.sleep(0.1)
        address = self._pins.get(named) if named is not None else None
        if named is None or address is None or address.pin != fingerprint(der):
            who = short_id(named) if named else "any member"
            log.info("refused a direct link from %s: its certificate is not %s's pin", remote, who)
            return None
        return named

    async def _read_frames(self, tls: ssl.SSLSocket, peer_id: str) -> None:
        reader = _linkio.Reader(tls)
        pings, window = 0, trio.current_time()
        while True:
            # One trip through the scheduler per frame: a member streaming frames must
            # not keep the rest of the node waiting (its data is always ready).
            await trio.lowlevel.checkpoint()
            channel, size, body = await reader.prefix()
            if channel == _linkio.PING:
                if trio.current_time() - window > 1.0:
                    pings, window = 0, trio.current_time()
                pings += 1
                if pings > PINGS_PER_S:
                    raise _linkio.LinkClosed(f"more than {PINGS_PER_S} pings a second")
                await _linkio.answer_ping(reader, size, body)
                continue
            spec = self._channels.get(channel)
            if spec is None:
                with trio.move_on_after(REGISTER_WAIT_S):  # a node still starting
                    while (spec := self._channels.get(channel)) is None:
                        await trio.sleep(0.05)
                if spec is None:
                    raise _linkio.LinkClosed(f"a frame on unknown channel {channel}")
            if size > spec.max_payload:
                if size > SKIP_AT_MOST * spec.max_payload:
                    raise _linkio.LinkClosed(f"a frame of {size} bytes is not worth reading")
                deadline = trio.current_time() + frame_timeout(size)
                left = size - reader.take(memoryview(bytearray(min(size, reader.buffered))))
                stop = threading.Event()
                await self._in_thread(_linkio.skip_blocking, tls, left, stop, deadline)
                frame = LinkFrame(body, size, None, None)
            else:
                # Room in the node's budget first: a sender whose frames we cannot hold
                # yet is slowed down (its writes wait), never mistaken for dead; the
                # payload's deadline starts once there is room.
                lease = await spec.budget.lease(peer_id, size) if size else None
                deadline = trio.current_time() + frame_timeout(size)
                try:
                    payload = await self._payload(reader, size, deadline)
                    frame = LinkFrame(body, size, payload, lease)
                except BaseException:
                    if lease is not None:
                        lease.release()
                    raise
            try:
                await spec.handler(peer_id, frame)
            except Exception as exc:  # a handler's failure ends only this frame
                log.debug("a frame from %s failed: %r", short_id(peer_id), exc)
                if frame.lease is not None:
                    frame.lease.release()

    async def _payload(self, reader: _linkio.Reader, size: int, deadline: float) -> np.ndarray:
        payload = np.empty(size, dtype=np.uint8)
        if size > INLINE_MAX:
            got = reader.take(payload.data)
            filling = (payload, got)
            stop = threading.Event()
            return await self._in_thread(
                _linkio.recv_blocking, reader.conn, filling, stop, deadline
            )
        with trio.fail_at(deadline):
            await reader.into(payload.data)
        return payload

    # ---- dialed links ------------------------------------------------------------

    async def _keep_outbound(self, out: _Outbound) -> None:
        """Open a dialed link and wait for the acceptor's welcome (its pin check passed);
        then read what comes back (pongs, or the peer closing) and measure the link now
        and then. A link that cannot be opened sends its peer's frames to libp2p for a
        while."""
        try:
            with out.scope:
                try:
                    out.conn = await self._open(out)
                    out.reader = _linkio.Reader(out.conn)
                    with trio.fail_after(PIN_WAIT_S + HANDSHAKE_TIMEOUT_S):
                        channel, size, _ = await out.reader.prefix()
                    if (channel, size) != (_linkio.PONG, 0):
                        raise _linkio.LinkClosed("no welcome after the handshake")
                except Exception as exc:  # closed, reset, timed out, refused by its pin
                    why = f"cannot open a direct link to {short_id(out.peer_id)}: {exc}"
                    log.info("%s; using libp2p", why)
                    self._unavailable_now(out, why)
                    out.end(why)
                    return
                self._backoff.pop(out.peer_id, None)
                out.opened.set()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._probe_loop, out)
                    await _ending_link(out, self._read_pongs(out))
                    nursery.cancel_scope.cancel()
        finally:
            out.opened.set()
            out.end("closed")
            if out.lock.locked():
                out.close_when_free = True  # the writer closes it after its frame
            elif out.conn is not None:
                _close(out.conn)

    async def _read_pongs(self, out: _Outbound) -> None:
        """A dialed link carries nothing back but pongs; its end (the peer closed or
        restarted) is seen here at once, so no frame is written into a dead link. A
        pong answering a ping already given up on is dropped; one answering a ping never
        sent ends the link."""
        assert out.reader is not None and out.conn is not None
        while True:
            await trio.lowlevel.checkpoint()
            if not out.reader.buffered:
                await trio.lowlevel.wait_readable(out.conn.fileno())
            woke = time.perf_counter()
            async with _held(out.lock, out):  # no concurrent TLS use with a writer
                with trio.fail_after(_linkio.STALL_S):
                    channel, size, body = await out.reader.prefix()
            seq = int.from_bytes(body, "big") if len(body) == 8 else -1
            if channel != _linkio.PONG or size or not 0 < seq <= out.pong_seq:
                raise _linkio.LinkClosed(f"the peer sent channel {channel} unasked")
            if seq == out.pong_seq and out.pong is not None:
                out.pong_at = woke
                out.pong.set()
                out.pong = None

    async def _probe_loop(self, out: _Outbound) -> None:
        await _ending_link(out, self._probing(out))

    async def _probing(self, out: _Outbound) -> None:
        bulk_at = -math.inf
        while True:
            pings = [await self._ping(out, 16) for _ in range(PROBE_PINGS)]
            answered = [p for p in pings if p is not None]
            if answered:
                rtt = statistics.median(answered)
                bandwidth = out.measured.bandwidth
                if trio.current_time() - bulk_at >= BULK_EVERY_S:
                    bulk = await self._ping(out, PROBE_BULK)
                    if bulk is not None and bulk > rtt:
                        bandwidth = min(MAX_BANDWIDTH, PROBE_BULK / (bulk - rtt))
                        bulk_at = trio.current_time()
                out.measured = _Measured(round(rtt * 1000, 3), bandwidth)
            await trio.sleep(PROBE_EVERY_S)

    async def _ping(self, out: _Outbound, size: int) -> float | None:
        """Seconds from writing a ping of ``size`` bytes (once the link is free) until
        its answer is readable; None when it is not answered within PONG_TIMEOUT_S (a
        busy peer: the sample is skipped)."""
        assert out.conn is not None
        out.pong_seq += 1
        answered = out.pong = trio.Event()
        async with _held(out.lock, out):
            started = time.perf_counter()
            with trio.fail_after(_linkio.STALL_S):
                seq = out.pong_seq.to_bytes(8, "big")
                await _linkio.send_inline(
                    out.conn, _linkio.PREFIX.pack(_linkio.PING, size, len(seq)) + seq
                )
                await _linkio.send_inline(out.conn, bytes(size))
        with trio.move_on_after(PONG_TIMEOUT_S):
            await answered.wait()
            return out.pong_at - started
        return None

    def _unavailable_now(self, out: _Outbound, why: str) -> None:
        """Frames to this peer take libp2p for a while (which doubles, up to RETRY_MAX_S,
        while dials keep failing)."""
        if self._pins.get(out.peer_id) == out.address:
            delay = self._backoff.get(out.peer_id, RETRY_MIN_S)
            self._backoff[out.peer_id] = min(RETRY_MAX_S, delay * 2)
            self._unavailable[out.peer_id] = (trio.current_time() + delay, why)
        if self._out.get(out.peer_id) is out:
            del self._out[out.peer_id]

    async def _open(self, out: _Outbound) -> ssl.SSLSocket:
        """A TLS connection to the first of the peer's hosts that presents its pin."""
        failures = []
        for host in out.address.hosts:
            try:
                return await self._open_at(host, out)
            except Exception as exc:  # refused, reset, timed out, another certificate
                failures.append(f"{host}: {exc}")
        raise _linkio.LinkClosed("; ".join(failures) or "no address")

    async def _open_at(self, host: str, out: _Outbound) -> ssl.SSLSocket:
        with trio.fail_after(DIAL_TIMEOUT_S):
            stream = await trio.open_tcp_stream(host, out.address.port)
        plain = socket.socket(fileno=stream.socket.detach())
        try:
            plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            plain.setblocking(False)
            tls = self.identity.client.wrap_socket(plain, do_handshake_on_connect=False)
        except BaseException:
            plain.close()
            raise
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await _handshake(tls)
            der = tls.getpeercert(binary_form=True) or b""
            if fingerprint(der) != out.address.pin or peer_named(der) != out.peer_id:
                raise _linkio.LinkClosed(  # someone else listens there: no frame for it
                    f"{host}:{out.address.port} presents another certificate than "
                    f"{short_id(out.peer_id)}'s pin"
                )
        except BaseException:
            tls.close()
            raise
        return tls


async def _ending_link(out: _Outbound, work: Awaitable[None]) -> None:
    """Await ``work``; the link's failure (the peer closed it, broke it, or stopped
    answering a write) ends the link, here, so it never escapes as an exception
    group out of the link's nursery."""
    try:
        await work
    except (_linkio.LinkClosed, OSError, ssl.SSLError, trio.TooSlowError) as exc:
        out.end(str(exc) or type(exc).__name__)
    except Exception as exc:  # whatever else breaks a link ends it, not the node
        log.warning("direct link to %s failed: %r", short_id(out.peer_id), exc)
        out.end(repr(exc))


@asynccontextmanager
async def _held(lock: trio.Lock, out: _Outbound | None = None) -> AsyncIterator[None]:
    """``lock``, taken without a trip through trio's scheduler when it is free (each
    trip costs about as much as the frame's whole TLS round trip). A link that ended
    while ``out``'s writer held it is closed on the way out."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        yield
    finally:
        lock.release()
        if out is not None and out.close_when_free and out.conn is not None:
            _close(out.conn)


def _close(conn: ssl.SSLSocket) -> None:
    """Close a socket trio may be waiting on (its waiters see ClosedResourceError)."""
    if conn.fileno() >= 0:
        trio.lowlevel.notify_closing(conn.fileno())
    conn.close()


async def _handshake(tls: ssl.SSLSocket) -> None:
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(tls.fileno())
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(tls.fileno())


class _Late:
    """What a worker thread returns when its payload missed the deadline."""


def _with_deadline(
    work: Callable[..., Any],
    conn: ssl.SSLSocket,
    arg: Any,
    stopped: Callable[[], bool],
    until: float,
) -> Any:
    """``work(conn, arg, stopped)`` in a worker thread, giving up at ``until`` (its
    monotonic clock; then it returns a ``_Late``: the caller raises TooSlowError)."""
    try:
        return work(conn, arg, lambda: stopped() or time.monotonic() > until)
    except _linkio.LinkClosed:
        if time.monotonic() > until:
            return _Late()
        raise


def _remote(conn: socket.socket) -> str:
    try:
        host, port = conn.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a closed socket"
