"""Join URIs: how a phone that cannot hear mDNS gets into a mesh.

    salala://join?mesh=1a2b3c4d&key=salala-mesh-…&peer=/ip4/192.168.1.20/tcp/4001/p2p/12D3…

The URI carries the mesh key, so it is a secret: share it like a password (a QR code
shown on your own screen, a message to yourself).
"""

from urllib.parse import parse_qs, urlencode, urlsplit

from .._errors import MeshError
from ._discovered import MalformedPeerError, settings_targets
from ._meshkey import MeshKey

SCHEME = "salala"


class InviteError(MeshError, ValueError):
    """A join URI that cannot be used."""


def make_invite(key: MeshKey, addrs: list[str]) -> str:
    query = urlencode({"mesh": key.mesh_id, "key": str(key), "peer": addrs}, doseq=True, safe="/")
    return f"{SCHEME}://join?{query}"


def parse_invite(uri: str) -> tuple[MeshKey, list[str]]:
    parts = urlsplit(uri.strip())
    if parts.scheme != SCHEME or parts.netloc != "join":
        raise InviteError(f"a join URI starts with {SCHEME}://join?, not {uri[:24]!r}")
    query = parse_qs(parts.query)
    if "key" not in query:
        raise InviteError("the join URI has no mesh key")
    key = MeshKey.parse(query["key"][0])
    if "mesh" in query and query["mesh"][0] != key.mesh_id:
        raise InviteError("the join URI's mesh id does not match its key (a damaged URI?)")
    peers = query.get("peer", [])
    if not peers:
        raise InviteError("the join URI names no peer to join through")
    try:
        settings_targets(peers)
    except MalformedPeerError as exc:
        raise InviteError(f"the join URI's peer: {exc}") from exc
    return key, peers
