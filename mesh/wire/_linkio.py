"""Frames on a direct link's TLS socket, byte for byte.

    [1-byte channel][8-byte payload size][4-byte header size][header][payload]

The prefix gives the whole frame's size before a payload byte is read, so the receiver
can refuse or lease it first, and can always find the next frame. Channel 0 is the
link's own ping (its payload is dropped and answered with a channel-1 pong); the others
carry one protocol's frames each.

The socket is non-blocking and OpenSSL does the cryptography in C, with the GIL
released. Two ways to move bytes, chosen by size (see ``_direct``):

- *inline*, on trio's thread: each call encrypts or decrypts what the kernel takes or
  holds and returns; trio waits for readiness in between. No thread hand-off, which on
  this machine costs about as much as a whole TLS round trip;
- *in a worker thread*, for big payloads: the same calls in a loop that polls the
  socket, so megabytes never hold the event loop.

Sends go from the callers' memoryviews; receives go with ``recv_into`` into a buffer
allocated once per frame, which the tensors then view.
"""

import select
import socket
import ssl
import struct
import time
from collections.abc import Callable

import numpy as np
import trio

PREFIX = struct.Struct(">BQI")
PING, PONG = 0, 1
MAX_HEADER = 1 << 20
MAX_PROBE = 1 << 20
STALL_S = 10.0  # bytes of a frame that do not move for this long end its link
POLL_S = 0.5  # how often a worker thread blocked on a socket checks whether to stop
CHUNK = 1 << 20
RECORD = 16 << 10  # the most one TLS record carries: what one decrypting read returns
BUFFER = 64 << 10


class LinkClosed(Exception):
    """The link ended: the peer closed it, broke it, stalled, or we shut it down."""


def shutdown(conn: socket.socket) -> None:
    """End the connection under ``conn`` for every waiter (trio or thread) at once."""
    try:
        fd = conn.fileno()
        if fd < 0:
            return
        dup = socket.socket(fileno=socket.dup(fd))
    except OSError:
        return  # already closed
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


def frame_parts(channel: int, head: bytes, views: list[memoryview]) -> list[bytes | memoryview]:
    """A frame as written: prefix, then the wire's head (its 4-byte length stripped, as
    the prefix carries it), then the payload views."""
    body = memoryview(head)[4:]
    size = sum(len(v) for v in views)
    return [PREFIX.pack(channel, size, len(body)), body, *views]


def _broken(exc: BaseException) -> LinkClosed:
    return LinkClosed(f"broken: {exc!r}")


# ---- inline, on trio's thread -------------------------------------------------------


async def send_inline(conn: ssl.SSLSocket, data: bytes | memoryview) -> None:
    """Write ``data`` whole; the caller bounds the time."""
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view[:CHUNK]) :]
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(conn.fileno())
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(conn.fileno())
        except (OSError, ssl.SSLError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise _broken(exc) from exc


async def recv_inline(conn: ssl.SSLSocket, view: memoryview) -> None:
    """Fill ``view``; the caller bounds the time."""
    got = 0
    while got < len(view):
        try:
            n = conn.recv_into(view[got:])
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(conn.fileno())
            continue
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(conn.fileno())
            continue
        except (OSError, ssl.SSLError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise _broken(exc) from exc
        if not n:
            raise LinkClosed("closed by the peer" if not got else f"closed after {got} bytes")
        got += n


class Reader:
    """The receiving side of a link: what the socket holds is decrypted into one buffer,
    so a small frame costs one call into OpenSSL, not one per field."""

    def __init__(self, conn: ssl.SSLSocket) -> None:
        self.conn = conn
        self._buffer = bytearray(BUFFER)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    @property
    def buffered(self) -> int:
        return self._end - self._start

    async def _fill(self) -> None:
        """At least one more byte into the buffer."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buffer) - self._end < RECORD:
            left = self.buffered
            self._view[:left] = self._view[self._start : self._end]
            self._start, self._end = 0, left
        while True:
            try:
                n = self.conn.recv_into(self._view[self._end :])
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.conn.fileno())
                continue
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.conn.fileno())
                continue
            except (OSError, ssl.SSLError) as exc:
                raise _broken(exc) from exc
            if not n:
                raise LinkClosed("closed by the peer" if not self.buffered else "closed mid-frame")
            self._end += n
            return

    async def exactly(self, count: int) -> memoryview:
        """The next ``count`` bytes (at most BUFFER - RECORD), valid until the next read."""
        while self.buffered < count:
            await self._fill()
        out = self._view[self._start : self._start + count]
        self._start += count
        return out

    def take(self, view: memoryview) -> int:
        """Copy what is buffered (up to ``len(view)``) into ``view``; how much."""
        count = min(self.buffered, len(view))
        view[:count] = self._view[self._start : self._start + count]
        self._start += count
        return count

    async def into(self, view: memoryview) -> None:
        """Fill ``view``: what is buffered, then straight from the socket."""
        got = self.take(view)
        if got < len(view):
            await recv_inline(self.conn, view[got:])

    async def prefix(self) -> tuple[int, int, bytes]:
        """(channel, payload size, header bytes) of the next frame. Waits as long as the
        link is idle; once a frame begins, its header must follow within STALL_S."""
        if not self.buffered:
            await self._fill()
        with trio.fail_after(STALL_S):
            channel, size, length = PREFIX.unpack(await self.exactly(PREFIX.size))
            if length > MAX_HEADER:
                raise LinkClosed(f"a frame header of {length} bytes")
            if length <= len(self._buffer) - RECORD:
                return channel, size, bytes(await self.exactly(length))
            body = bytearray(length)
            await self.into(memoryview(body))
            return channel, size, bytes(body)


async def answer_ping(reader: Reader, size: int, seq: bytes) -> None:
    """Drop a ping's payload and answer it with a pong that echoes its sequence number
    (its header: at most 8 bytes)."""
    if size > MAX_PROBE or len(seq) > 8:
        raise LinkClosed(f"a ping of {size} bytes, numbered with {len(seq)}")
    with trio.fail_after(STALL_S):
        await reader.into(memoryview(bytearray(size)))
        await send_inline(reader.conn, PREFIX.pack(PONG, 0, len(seq)) + seq)


# ---- in a worker thread, for big payloads -----------------------------------------------


def _wait(
    conn: ssl.SSLSocket, events: int, stopped: Callable[[], bool], since: float | None
) -> None:
    """Wait (in a worker thread) until ``conn`` is ready; LinkClosed once ``stopped()``
    or, ``since`` the last progress, nothing moved for STALL_S; checked on every wake-up
    (a peer trickling a byte at a time wakes us often, and moves nothing). Writes pass
    no ``since``: a receiver that holds back is backpressure, bounded by the deadline."""
    poller = select.poll()
    poller.register(conn, events)
    while True:
        if stopped():
            raise LinkClosed("shut down")
        if since is not None and time.monotonic() - since > STALL_S:
            raise LinkClosed(f"no progress for {STALL_S:.0f} s")
        if poller.poll(POLL_S * 1000):
            return


def send_blocking(
    conn: ssl.SSLSocket, views: list[memoryview], stopped: Callable[[], bool]
) -> None:
    """``send_inline`` for a worker thread: the socket stays non-blocking, readiness is
    polled, and ``stopped()`` is asked every POLL_S."""
    for whole in views:
        view = memoryview(whole).cast("B")
        while view:
            try:
                view = view[conn.send(view[:CHUNK]) :]
            except ssl.SSLWantWriteError:
                _wait(conn, select.POLLOUT, stopped, None)
            except ssl.SSLWantReadError:
                _wait(conn, select.POLLIN, stopped, None)
            except (OSError, ssl.SSLError) as exc:
                raise _broken(exc) from exc


def recv_blocking(
    conn: ssl.SSLSocket, filling: tuple[np.ndarray, int], stopped: Callable[[], bool]
) -> np.ndarray:
    """Fill a payload buffer from ``got`` bytes on, in a worker thread; the buffer."""
    payload, got = filling
    view, size, last = payload.data, len(payload), time.monotonic()
    while got < size:
        try:
            n = conn.recv_into(view[got:])
        except ssl.SSLWantReadError:
            _wait(conn, select.POLLIN, stopped, last)
            continue
        except ssl.SSLWantWriteError:
            _wait(conn, select.POLLOUT, stopped, last)
            continue
        except (OSError, ssl.SSLError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise _broken(exc) from exc
        if not n:
            raise LinkClosed(f"closed after {got} of {size} payload bytes")
        got, last = got + n, time.monotonic()
    return payload


def skip_blocking(conn: ssl.SSLSocket, size: int, stopped: Callable[[], bool]) -> None:
    """Read and drop ``size`` bytes (an over-limit frame), keeping the link in step."""
    scratch = np.empty(min(size, CHUNK), dtype=np.uint8)
    while size:
        part = min(size, CHUNK)
        recv_blocking(conn, (scratch[:part], 0), stopped)
        size -= part
