"""Outbound frames to members: a direct link when there is one, else a libp2p stream.

The direct link (see ``_direct``) is tried first. When a peer has none (it advertises
none, or it could not be opened) frames go as before: one long-lived libp2p stream per
peer and protocol, opened once (that costs about 3 ms) and written by one sender at a
time. The bytes of a frame are the same on both paths, and so are the results. The wire
knows nothing of membership: it needs only something that opens streams to members and
holds the direct links (`Streams`), which the mesh provides.
"""

import time
from typing import Protocol

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from .._errors import MeshError
from .._peerid import short_id
from ._direct import DirectLinks, LinkDown
from ._frames import frame_timeout, write_frame

MEASURE_FROM = 256 << 10  # frames this big tell the libp2p path's bandwidth


class Streams(Protocol):
    """What the wire needs from the mesh: our id, new streams to members, and the
    direct links."""

    @property
    def peer_id(self) -> str: ...

    @property
    def direct(self) -> DirectLinks | None: ...

    async def open_stream(self, peer_id: str, protocol: TProtocol) -> INetStream: ...


class LinkError(MeshError):
    """A frame could not be sent to a peer."""


class Links:
    """Frames of one protocol to members: over direct links, or over libp2p streams."""

    def __init__(self, streams: Streams, protocol: TProtocol) -> None:
        self._streams_source = streams
        self._protocol = protocol
        self._streams: dict[str, INetStream] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def send(self, peer_id: str, head: bytes, views: list[memoryview]) -> None:
        size = sum(len(view) for view in views)
        direct = self._streams_source.direct
        if direct is not None:
            try:
                await direct.send(peer_id, self._protocol, head, views, frame_timeout(size))
                return
            except LinkDown:
                pass  # over libp2p, below
            except trio.TooSlowError as exc:
                raise LinkError(f"cannot send to {short_id(peer_id)}: {exc!r}") from exc
        await self._send_over_libp2p(peer_id, head, views, size)

    async def _send_over_libp2p(
        self, peer_id: str, head: bytes, views: list[memoryview], size: int
    ) -> None:
        async with self._locks.setdefault(peer_id, trio.Lock()):
            for fresh in (False, True):  # a stream from before a restart fails once
                stream = self._streams.get(peer_id)
                try:
                    if stream is None or fresh:
                        stream = await self._streams_source.open_stream(peer_id, self._protocol)
                        self._streams[peer_id] = stream
                    started = time.perf_counter()
                    await write_frame(stream, head, views, frame_timeout(size))
                    direct = self._streams_source.direct
                    if direct is not None:
                        direct.count(peer_id, "libp2p")
                        if size >= MEASURE_FROM:
                            direct.observe_fallback(peer_id, size, time.perf_counter() - started)
                    return
                except Exception as exc:  # resets, timeouts, closed connections
                    self._streams.pop(peer_id, None)
                    if fresh:
                        raise LinkError(f"cannot send to {short_id(peer_id)}: {exc!r}") from exc
