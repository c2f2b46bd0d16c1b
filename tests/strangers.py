"""A stranger: a stock py-libp2p host without the mesh key, as anyone could run.

Unlike our own host it keeps py-libp2p's defaults (identify, identify-push, ping, and
identify run towards every peer it connects to), so it learns whatever a node answers,
and records any identify a node runs towards it.
"""

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING
from libp2p.identity.identify.identify import ID as IDENTIFY
from libp2p.identity.identify_push.identify_push import ID_PUSH as IDENTIFY_PUSH
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import Yamux

MESH = Path(__file__).resolve().parent.parent / "mesh"
LIBP2P_DEFAULTS = [IDENTIFY, IDENTIFY_PUSH, PING]


def salala_protocols() -> list[TProtocol]:
    """Every /salala/ protocol the code names, so that a new one is tried too."""
    found = set()
    for path in MESH.rglob("*.py"):
        found |= set(re.findall(r'TProtocol\("(/salala/[^"]+)"\)', path.read_text()))
    return sorted(TProtocol(p) for p in found)


@dataclass
class Stranger:
    host: IHost
    identified_by: list[str] = field(default_factory=list)  # who opened identify to us


@asynccontextmanager
async def stranger(listen: str = "/ip4/127.0.0.1/tcp/0") -> AsyncIterator[Stranger]:
    key_pair = create_new_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    addrs = [multiaddr.Multiaddr(listen)]
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL): Yamux},
        listen_addrs=addrs,
        connection_config=ConnectionConfig(min_connections=0, low_watermark=0),
    )
    result = Stranger(host)

    async def record_identify(stream: INetStream) -> None:
        result.identified_by.append(stream.muxed_conn.peer_id.to_base58())
        with trio.move_on_after(2):
            await stream.reset()

    host.set_stream_handler(IDENTIFY, record_identify)
    async with host.run(listen_addrs=addrs):
        yield result
