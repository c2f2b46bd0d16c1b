"""The membership exchange between two authenticated members.

Both members of a pair run this every HEARTBEAT_S over their own stream. One message
shape both ways: ``{"digest": {peer_id: [incarnation, seq]}, "adverts": [...]}``.
Each side sends the adverts the other's last digest lacks, so after one round both know
everything either knew (peer exchange), and later rounds carry only what changed. The
round trip doubles as the heartbeat: its time is the RTT, its failure is a silent peer.
"""

from typing import Any

from libp2p.custom_types import TProtocol

from .._errors import WireError
from ..wire import field
from ._adverts import Advert

PROTOCOL = TProtocol("/salala/mesh/1.0.0")
MAX_SYNC_FRAME = 4 << 20
MAX_ENTRIES = 1024


def sync_message(digest: dict[str, tuple[int, int]], adverts: list[Advert]) -> dict[str, Any]:
    return {
        "digest": {peer: list(version) for peer, version in digest.items()},
        "adverts": [a.to_wire() for a in adverts],
    }


def parse_sync(message: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], list[Any]]:
    """The digest (validated) and the raw adverts (each validated when applied)."""
    digest = field(message, "digest", dict)
    adverts = field(message, "adverts", list)
    if len(digest) > MAX_ENTRIES or len(adverts) > MAX_ENTRIES:
        raise WireError(f"sync messages carry at most {MAX_ENTRIES} entries")
    parsed = {}
    for peer, version in digest.items():
        if (
            not isinstance(peer, str)
            or not isinstance(version, list)
            or len(version) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in version)
        ):
            raise WireError("digest entries must map peer ids to [incarnation, seq]")
        parsed[peer] = (version[0], version[1])
    return parsed, adverts
