"""Frames on a direct link's blocking TLS socket: what its two threads do, byte for byte.

    [1-byte channel][8-byte payload size][4-byte header size][header][payload]

The prefix gives the whole frame's size before a payload byte is read, so the receiver
can refuse or lease it first, and can always find the next frame. Channel 0 is the
link's own ping (its payload is dropped and answered with a channel-1 pong); the others
carry one protocol's frames each. Sends go from the callers' memoryviews; receives go
with ``recv_into`` into a buffer allocated once per frame, which the tensors then view.

Every call here blocks and runs in a link's thread, never on the event loop. OpenSSL
does the cryptography in C with the GIL released.
"""

import socket
import ssl
import struct
import time
from collections.abc import Callable

import numpy as np

PREFIX = struct.Struct(">BQI")
PING, PONG = 0, 1
MAX_HEADER = 1 << 20
MAX_PROBE = 1 << 20
SMALL = 64 << 10  # frames up to this size leave in one write
STALL_S = 10.0  # a frame that moves no byte for this long ends its link


class LinkClosed(Exception):
    """The link ended: the peer closed it, broke it, stalled, or we shut it down."""


def shutdown(conn: socket.socket) -> None:
    """Wake any thread blocked on ``conn`` (each then sees the link as closed)."""
    try:
        dup = socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return  # already closed
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


def recv_exactly(
    conn: ssl.SSLSocket, view: memoryview, stopped: Callable[[], bool], idle: bool = False
) -> None:
    """Fill ``view``. Waiting for the first byte of an ``idle`` read may last forever
    (until ``stopped``); otherwise STALL_S without progress ends the link."""
    got, last = 0, time.monotonic()
    while got < len(view):
        try:
            n = conn.recv_into(view[got:])
        except TimeoutError:
            if stopped():
                raise LinkClosed("shut down") from None
            if idle and not got:
                continue
            if time.monotonic() - last > STALL_S:
                raise LinkClosed(f"stalled after {got} of {len(view)} bytes") from None
            continue
        except (OSError, ssl.SSLError) as exc:
            raise LinkClosed(f"broken: {exc!r}") from exc
        if not n:
            raise LinkClosed("closed by the peer" if not got else f"closed after {got} bytes")
        got, last = got + n, time.monotonic()


def skip(conn: ssl.SSLSocket, size: int, stopped: Callable[[], bool]) -> None:
    scratch = memoryview(bytearray(min(size, 1 << 20)))
    while size:
        part = scratch[: min(size, len(scratch))]
        recv_exactly(conn, part, stopped)
        size -= len(part)


def send_all(conn: ssl.SSLSocket, parts: list[bytes | memoryview]) -> None:
    """Write whole frames: small ones joined into one write, big ones from their views."""
    if sum(len(p) for p in parts) <= SMALL:
        parts = [b"".join(parts)]
    try:
        for part in parts:
            conn.sendall(part)
    except (OSError, ssl.SSLError) as exc:  # a send timeout is an OSError too
        raise LinkClosed(f"broken: {exc!r}") from exc


def frame_parts(channel: int, head: bytes, views: list[memoryview]) -> list[bytes | memoryview]:
    """A frame as written: prefix, then the wire's head (its 4-byte length stripped, as
    the prefix carries it), then the payload views."""
    body = memoryview(head)[4:]
    size = sum(len(v) for v in views)
    return [PREFIX.pack(channel, size, len(body)), body, *views]


def read_prefix(conn: ssl.SSLSocket, stopped: Callable[[], bool]) -> tuple[int, int, bytes]:
    """(channel, payload size, header bytes) of the next frame; waits while idle."""
    prefix = bytearray(PREFIX.size)
    recv_exactly(conn, memoryview(prefix), stopped, idle=True)
    channel, size, length = PREFIX.unpack(prefix)
    if length > MAX_HEADER:
        raise LinkClosed(f"a frame header of {length} bytes")
    body = bytearray(length)
    recv_exactly(conn, memoryview(body), stopped)
    return channel, size, bytes(body)


def read_payload(conn: ssl.SSLSocket, size: int, stopped: Callable[[], bool]) -> np.ndarray:
    payload = np.empty(size, dtype=np.uint8)
    recv_exactly(conn, payload.data, stopped)
    return payload


def probe(conn: ssl.SSLSocket, size: int, stopped: Callable[[], bool]) -> float:
    """Seconds for a ping of ``size`` payload bytes to be answered."""
    payload = memoryview(bytes(size))
    started = time.perf_counter()
    send_all(conn, [PREFIX.pack(PING, size, 0), payload])
    channel, _, _ = read_prefix(conn, stopped)
    if channel != PONG:
        raise LinkClosed(f"a ping was answered on channel {channel}")
    return time.perf_counter() - started


def answer_ping(conn: ssl.SSLSocket, size: int, stopped: Callable[[], bool]) -> None:
    if size > MAX_PROBE:
        raise LinkClosed(f"a ping of {size} bytes")
    skip(conn, size, stopped)
    send_all(conn, [PREFIX.pack(PONG, 0, 0)])
