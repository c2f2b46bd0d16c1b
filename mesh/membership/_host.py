"""The device's libp2p host: TCP, Noise only, Yamux only, and silent to strangers.

py-libp2p's defaults also accept plaintext, secio and Mplex, and can start an mDNS
responder on every interface; we pass every option explicitly so none of that is on.

Its host also answers identify (``/ipfs/id/1.0.0``), identify-push and ping to anyone
who has finished Noise, lists every protocol it serves to a multistream ``ls``, and runs
identify towards every peer that connects. A stranger would learn our addresses and
protocols before proving the mesh key, and could write its claims into our peerstore.
So the host serves none of them and never identifies anyone: protocol negotiation goes
through ``_Gate``, which shows a peer that has not been admitted (one that has not passed
the mesh-key handshake) only the open protocols, the handshake itself.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost, IMultiselectCommunicator
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import StreamHandlerFn, TProtocol
from libp2p.host.basic_host import _IdentifyNotifee
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect import DEFAULT_NEGOTIATE_TIMEOUT, Multiselect
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL
from libp2p.stream_muxer.yamux.yamux import Yamux

from .._errors import ListenAddressError

# Multistream and Noise negotiation of a new connection must finish within this; a
# client that connects and says nothing is dropped after it.
NEGOTIATE_TIMEOUT_S = 10


def _nobody(peer: ID) -> bool:
    return False


class _Gate(Multiselect):
    """Multistream-select that, to a peer not admitted, knows only the open protocols.

    A stranger asking for anything else gets multistream's "na", exactly as if we did not
    speak it, and ``ls`` lists the open protocols alone.
    """

    def __init__(self, open_protocols: frozenset[TProtocol]) -> None:
        super().__init__({})
        self.open_protocols = open_protocols
        self.admitted: Callable[[ID], bool] = _nobody

    async def negotiate(
        self,
        communicator: IMultiselectCommunicator,
        negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT,
    ) -> tuple[TProtocol | None, StreamHandlerFn | None]:
        stream = getattr(communicator, "read_writer", None)
        peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
        if isinstance(peer, ID) and self.admitted(peer):
            visible = dict(self.handlers)
        else:
            visible = {p: h for p, h in self.handlers.items() if p in self.open_protocols}
        return await Multiselect(visible).negotiate(communicator, negotiate_timeout)


def admit(host: IHost, admitted: Callable[[ID], bool]) -> None:
    """Show ``admitted`` peers every protocol the host serves (others see the open ones)."""
    gate = host.get_mux()
    assert isinstance(gate, _Gate), "hosts come from open_host"
    gate.admitted = admitted


def _never_identify(peer_id: ID, *, reason: str) -> None:
    """Stands in for BasicHost._schedule_identify: we take no one's claims about itself."""


def parse_multiaddrs(addrs: list[str], what: str = "listen address") -> list[multiaddr.Multiaddr]:
    parsed = []
    for text in addrs:
        try:
            parsed.append(multiaddr.Multiaddr(text))
        except Exception as exc:  # multiaddr raises several unrelated types
            raise ListenAddressError(f"invalid {what} {text!r}: {exc}") from exc
    return parsed


@asynccontextmanager
async def open_host(
    key_pair: KeyPair, listen: list[str], open_protocols: frozenset[TProtocol] = frozenset()
) -> AsyncIterator[IHost]:
    """Run a libp2p host listening on ``listen`` for the duration of the block.

    Until ``admit`` says otherwise, every peer may negotiate ``open_protocols`` only.
    """
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
    # Drop identify, identify-push and ping (new_host takes no empty set of defaults),
    # and the identify that py-libp2p starts on every connection and address change.
    setattr(host, "multiselect", _Gate(open_protocols))  # noqa: B010 (BasicHost's attribute)
    setattr(host, "_schedule_identify", _never_identify)  # noqa: B010
    network = host.get_network()
    for notifee in [n for n in getattr(network, "notifees", []) if isinstance(n, _IdentifyNotifee)]:
        network.remove_notifee(notifee)
    async with AsyncExitStack() as stack:
        # Binding a local port does not wait on the network, so no timeout here; a
        # cancel scope around a nursery-holding context could not be left early anyway.
        try:
            await stack.enter_async_context(host.run(listen_addrs=addrs))
        except OSError as exc:
            raise ListenAddressError(f"cannot listen on {listen}: {exc}") from exc
        yield host
