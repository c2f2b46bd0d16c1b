"""The device's libp2p host: TCP, Noise only, Yamux only.

py-libp2p's defaults also accept plaintext, secio and Mplex, and can start an mDNS
responder on every interface; we pass every option explicitly so none of that is on.
"""

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import Yamux

from .._errors import ListenAddressError

# Multistream and Noise negotiation of a new connection must finish within this; a
# client that connects and says nothing is dropped after it.
NEGOTIATE_TIMEOUT_S = 10


def parse_multiaddrs(addrs: list[str], what: str = "listen address") -> list[multiaddr.Multiaddr]:
    parsed = []
    for text in addrs:
        try:
            parsed.append(multiaddr.Multiaddr(text))
        except Exception as exc:  # multiaddr raises several unrelated types
            raise ListenAddressError(f"invalid {what} {text!r}: {exc}") from exc
    return parsed


@asynccontextmanager
async def open_host(key_pair: KeyPair, listen: list[str]) -> AsyncIterator[IHost]:
    """Run a libp2p host listening on ``listen`` for the duration of the block."""
    addrs = parse_multiaddrs(listen)
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL): Yamux},
        listen_addrs=addrs,
        enable_mDNS=False,
        negotiate_timeout=NEGOTIATE_TIMEOUT_S,
        # py-libp2p's auto-connector dials everyone in the peerstore (strangers included)
        # to keep 50+ connections; membership decides whom we talk to instead.
        connection_config=ConnectionConfig(min_connections=0, low_watermark=0),
    )
    async with AsyncExitStack() as stack:
        # Binding a local port does not wait on the network, so no timeout here; a
        # cancel scope around a nursery-holding context could not be left early anyway.
        try:
            await stack.enter_async_context(host.run(listen_addrs=addrs))
        except OSError as exc:
            raise ListenAddressError(f"cannot listen on {listen}: {exc}") from exc
        yield host
