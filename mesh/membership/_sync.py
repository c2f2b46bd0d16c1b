"""The membership exchange between two authenticated members.

Both members of a pair run this every HEARTBEAT_S over their own stream. One message
shape both ways: ``{"digest": {peer_id: [incarnation, seq]}, "adverts": [...]}``.
Each side sends the adverts the other's last digest lacks, so after one round both know
everything either knew (peer exchange), and later rounds carry only what changed. The
round trip doubles as the heartbeat: its time is the RTT, its failure is a silent peer.
"""

from typing import Any

from libp2p.custom_types import TProtocol

from ..wire import PEER_ID, array, integer, mapping, opaque, record, row
from ._adverts import Advert

PROTOCOL = TProtocol("/salala/mesh/1.0.0")
MAX_SYNC_FRAME = 4 << 20
MAX_ENTRIES = 1024


def sync_message(digest: dict[str, tuple[int, int]], adverts: list[Advert]) -> dict[str, Any]:
    return {
        "digest": {peer: list(version) for peer, version in digest.items()},
        "adverts": [a.to_wire() for a in adverts],
    }


SYNC = record(
    {
        "digest": mapping(PEER_ID, row(integer(0, 1 << 63), integer(0, 1 << 63)), MAX_ENTRIES),
        "adverts": array(opaque(dict), MAX_ENTRIES),
    }
)


def parse_sync(message: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], list[Any]]:
    """The digest of a SYNC-checked message, and its raw adverts (each validated, and
    dropped alone if bad, when applied)."""
    digest = {peer: (version[0], version[1]) for peer, version in message["digest"].items()}
    return digest, message["adverts"]
