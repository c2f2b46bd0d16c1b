"""Outbound frames to members: one long-lived stream per peer and protocol.

Opening a libp2p stream costs about 3 ms, so a stream is opened once per peer and
reused, written by one sender at a time. The wire knows nothing of membership: it needs
only something that opens streams to members (`Streams`), which the mesh provides.
"""

from typing import Protocol

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from .._errors import MeshError
from .._peerid import short_id
from ._frames import frame_timeout, write_frame


class Streams(Protocol):
    """What the wire needs from the mesh: our id, and new streams to members."""

    @property
    def peer_id(self) -> str: ...

    async def open_stream(self, peer_id: str, protocol: TProtocol) -> INetStream: ...


class LinkError(MeshError):
    """A frame could not be sent to a peer."""


class Links:
    """One outbound stream per peer for one protocol, written by one sender at a time."""

    def __init__(self, streams: Streams, protocol: TProtocol) -> None:
        self._streams_source = streams
        self._protocol = protocol
        self._streams: dict[str, INetStream] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def send(self, peer_id: str, head: bytes, views: list[memoryview]) -> None:
        async with self._locks.setdefault(peer_id, trio.Lock()):
            for fresh in (False, True):  # a stream from before a restart fails once
                stream = self._streams.get(peer_id)
                try:
                    if stream is None or fresh:
                        stream = await self._streams_source.open_stream(peer_id, self._protocol)
                        self._streams[peer_id] = stream
                    size = sum(len(view) for view in views)
                    await write_frame(stream, head, views, frame_timeout(size))
                    return
                except Exception as exc:  # resets, timeouts, closed connections
                    self._streams.pop(peer_id, None)
                    if fresh:
                        raise LinkError(f"cannot send to {short_id(peer_id)}: {exc!r}") from exc
