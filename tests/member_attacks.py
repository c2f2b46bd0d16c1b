"""A hostile member: a libp2p host in the test process that holds the mesh key, proves
it, and then sends a node whatever a test wants on any protocol."""

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import psutil
import trio
from conftest import NodeProcess
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from mesh_helpers import identity
from salala.mesh import MeshKey
from salala.mesh.inference._headers import INFER_FRAME
from salala.mesh.inference._serving import PROTOCOL as INFER
from salala.mesh.membership import _auth
from salala.mesh.membership._host import admit, open_host
from salala.mesh.wire import opaque, read_header, read_message, write_message
from salala.mesh.wire._frames import encode_frame

ANY_MAP = opaque(dict)


@dataclass
class Member:
    host: IHost
    target: Any  # the node's libp2p ID
    refusals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    async def open(self, protocol: str) -> INetStream:
        with trio.fail_after(10):
            return await self.host.new_stream(self.target, [TProtocol(protocol)])

    async def ask(self, protocol: str, message: dict[str, Any], timeout: float = 30) -> Any:
        """One control message; the node's first answer (any map)."""
        stream = await self.open(protocol)
        try:
            await write_message(stream, message)
            return await read_message(stream, ANY_MAP, timeout)
        finally:  # a connection carries a bounded number of open streams
            with trio.move_on_after(2):
                await stream.reset()

    async def send_frame(
        self, protocol: str, header: dict[str, Any], tensors: dict[str, Any] | None = None
    ) -> INetStream:
        head, views = encode_frame(header, tensors or {})
        stream = await self.open(protocol)
        with trio.fail_after(10):
            await stream.write(head)
            for view in views:
                await stream.write(bytes(view))
        return stream

    async def refusal(self, rid: str, timeout: float = 15) -> dict[str, Any]:
        """The error frame the node sent us for request ``rid``."""
        with trio.fail_after(timeout):
            while True:
                found = [r for r in self.refusals if r.get("rid") == rid]
                if found:
                    return found[0]
                await trio.sleep(0.05)


@asynccontextmanager
async def member_of(
    node: NodeProcess,
    serve: dict[str, Callable[[INetStream], Awaitable[None]]] | None = None,
) -> AsyncIterator[Member]:
    """A member connected to ``node``; it records inference refusals sent back to it and
    serves ``serve`` protocols (a lying fetch source, say)."""
    key = MeshKey.parse((node.data_dir / "mesh.key").read_text())
    _, addr = identity(node)
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    async with open_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as host:
        admit(host, lambda peer: peer == info.peer_id)  # the node may open streams to us
        member = Member(host, info.peer_id)

        async def take_replies(stream: INetStream) -> None:
            try:
                while True:
                    header, _ = await read_header(stream, INFER_FRAME, 60)
                    member.refusals.append(header)
            except Exception:  # the node closed the stream: nothing more to record
                pass

        host.set_stream_handler(INFER, take_replies)
        for protocol, handler in (serve or {}).items():
            host.set_stream_handler(TProtocol(protocol), handler)
        with trio.fail_after(10):
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [_auth.PROTOCOL])
            await _auth.prove_as_dialer(stream, key, host.get_id(), info.peer_id)
        try:
            yield member
        finally:
            with trio.move_on_after(5):
                await host.disconnect(info.peer_id)


def rss(node: NodeProcess) -> int:
    return int(psutil.Process(node.process.pid).memory_info().rss)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
