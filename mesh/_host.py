"""The device's libp2p host: TCP, Noise only, Yamux only.

py-libp2p's defaults also accept plaintext, secio and Mplex, and can start an mDNS
responder on every interface; we pass every option explicitly so none of that is on.
"""

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import multiaddr
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import Yamux

from ._errors import ListenAddressError


@dataclass(frozen=True)
class MeshHost:
    """What the rest of the node needs to know about its running host."""

    peer_id: str
    addrs: tuple[str, ...]


def parse_listen_addrs(addrs: list[str]) -> list[multiaddr.Multiaddr]:
    parsed = []
    for text in addrs:
        try:
            parsed.append(multiaddr.Multiaddr(text))
        except Exception as exc:  # multiaddr raises several unrelated types
            raise ListenAddressError(f"invalid listen address {text!r}: {exc}") from exc
    return parsed


@asynccontextmanager
async def open_host(key_pair: KeyPair, listen: list[str]) -> AsyncIterator[MeshHost]:
    """Run a libp2p host listening on ``listen`` for the duration of the block."""
    addrs = parse_listen_addrs(listen)
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL): Yamux},
        listen_addrs=addrs,
        enable_mDNS=False,
    )
    async with AsyncExitStack() as stack:
        # Binding a local port does not wait on the network, so no timeout here; a
        # cancel scope around a nursery-holding context could not be left early anyway.
        try:
            await stack.enter_async_context(host.run(listen_addrs=addrs))
        except OSError as exc:
            raise ListenAddressError(f"cannot listen on {listen}: {exc}") from exc
        yield MeshHost(
            peer_id=host.get_id().to_base58(),
            addrs=tuple(str(a) for a in host.get_addrs()),
        )
