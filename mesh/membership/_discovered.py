"""The one gate for what discovery hands us: peer ids, addresses, and how many of them.

Every source is untrusted: anyone on the LAN can publish an mDNS record, a settings
file or a join URI can be mistyped, and a member relays adverts it got from others.
Each reaches the mesh only as a checked ``(peer id, addresses)``:

- a peer id must decode as a libp2p ID that carries its public key (every Salala node
  has an Ed25519 id, and adverts are checked against that key), in its one canonical
  base58 spelling, at most MAX_PEER_ID_CHARS long;
- an address must parse as a multiaddr of the one shape we dial,
  ``/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>/p2p/<that peer id>``, at most
  MAX_ADDR_CHARS long, and a peer brings at most MAX_ADDRS of them.

Input from the network is dropped with one debug line naming its source: ``mdns``, or
``exchange`` (adverts sent or relayed in the membership exchange, checked through
``_adverts.advert_from_wire``). Settings raise instead (``--peer`` and config.toml
through ``settings_targets``, ``--join`` through ``_invite.parse_invite``), so a bad one
stops the node at start with one clear line.
"""

import logging
from collections.abc import Mapping

import multiaddr
from libp2p.peer.id import ID

from .._errors import MeshError

log = logging.getLogger(__name__)

MAX_PEER_ID_CHARS = 128
MAX_ADDR_CHARS = 256
MAX_ADDRS = 16
MAX_TXT_BYTES = 4096  # a real record is one id and up to 16 addresses: well under this
_HOSTS = {"ip4", "ip6", "dns", "dns4", "dns6"}


class MalformedPeerError(MeshError, ValueError):
    """A peer id or address from discovery or settings that cannot be used."""


def check_peer_id(value: object) -> str:
    """``value`` if it is a canonical peer id carrying its public key."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID_CHARS:
        raise MalformedPeerError(f"a peer id is a string of 1-{MAX_PEER_ID_CHARS} characters")
    try:
        peer = ID.from_base58(value)
        canonical = peer.to_base58()
        key = peer.extract_public_key()
    except Exception as exc:  # base58 and multihash raise several unrelated types
        raise MalformedPeerError(f"{value[:60]!r} is not a peer id") from exc
    if canonical != value or key is None:
        raise MalformedPeerError(f"{value[:60]!r} is not a peer id")
    return value


def peer_of_addr(value: object) -> str:
    """The peer id in an address's ``/p2p/`` part (checked), before the address itself is."""
    if not isinstance(value, str) or len(value) > MAX_ADDR_CHARS:
        raise MalformedPeerError(f"an address is a string of at most {MAX_ADDR_CHARS} characters")
    parts = value.rstrip("/").split("/")
    if "p2p" not in parts or parts.index("p2p") + 1 >= len(parts):
        raise MalformedPeerError(f"{value!r} needs a /p2p/<peer id> part")
    try:
        return check_peer_id(parts[parts.index("p2p") + 1])
    except MalformedPeerError as exc:
        raise MalformedPeerError(f"{value!r}: {exc}") from exc


def check_addr(value: object, peer_id: str) -> str:
    """``value`` if it is an address we can dial that ends in ``/p2p/<peer_id>``."""
    if peer_of_addr(value) != peer_id:
        raise MalformedPeerError(f"{value!r} is not an address of {peer_id}")
    assert isinstance(value, str)
    try:
        protocols = [p.name for p in multiaddr.Multiaddr(value).protocols()]
    except Exception as exc:  # multiaddr raises several unrelated types
        raise MalformedPeerError(f"{value!r}: {exc}") from exc
    if len(protocols) != 3 or protocols[0] not in _HOSTS or protocols[1:] != ["tcp", "p2p"]:
        raise MalformedPeerError(f"{value!r} is not /ip4|ip6|dns…/<host>/tcp/<port>/p2p/<id>")
    return value


def check_addrs(values: object, peer_id: str) -> list[str]:
    """Every address valid, and at most MAX_ADDRS of them (for signed adverts: all or none)."""
    if not isinstance(values, list | tuple) or len(values) > MAX_ADDRS:
        raise MalformedPeerError(f"a peer has a list of at most {MAX_ADDRS} addresses")
    return [check_addr(value, peer_id) for value in values]


def settings_targets(addrs: list[str]) -> dict[str, list[str]]:
    """Addresses from settings (``--peer``, config.toml, ``--join``) by peer id.

    Raises MalformedPeerError naming the first bad one: a typo stops the node at start.
    """
    targets: dict[str, list[str]] = {}
    for addr in addrs:
        try:
            peer_id = peer_of_addr(addr)
            targets.setdefault(peer_id, []).append(check_addr(addr, peer_id))
        except MalformedPeerError as exc:
            raise MalformedPeerError(f"invalid peer address: {exc}") from exc
    for peer_id, found in targets.items():
        if len(found) > MAX_ADDRS:
            raise MalformedPeerError(f"more than {MAX_ADDRS} addresses for peer {peer_id}")
    return targets


def from_mdns(properties: Mapping[bytes, bytes | None]) -> tuple[str, list[str]] | None:
    """The peer id and addresses in an mDNS TXT record, or None (logged) if unusable.

    Bad addresses are dropped one by one (a record is not signed, there is nothing to
    keep whole); a record left with none, or with a bad id, is dropped.
    """
    try:
        size = sum(len(k) + len(v or b"") for k, v in properties.items())
        if size > MAX_TXT_BYTES:
            raise MalformedPeerError(f"TXT record of {size} bytes")
        props = {k.decode(): (v or b"").decode() for k, v in properties.items()}
        peer_id = check_peer_id(props.get("id"))
    except (MalformedPeerError, UnicodeDecodeError, AttributeError) as exc:
        dropped("mdns", exc)
        return None
    addrs = []
    for name in sorted(props, key=lambda k: (len(k), k)):
        if name.startswith("a") and name[1:].isdigit():
            try:
                addrs.append(check_addr(props[name], peer_id))
            except MalformedPeerError as exc:
                dropped("mdns", exc)
    if not addrs:
        dropped("mdns", f"no usable address for {peer_id}")
        return None
    return peer_id, addrs[:MAX_ADDRS]


def dropped(source: str, reason: object) -> None:
    """The one log line for discovery input we do not use."""
    log.debug("dropped from %s: %s", source, reason)
