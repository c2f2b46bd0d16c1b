"""Who is in the mesh: adverts, when each member was last heard from, and its RTT.

Pure state with explicit times (trio's clock in the service, any numbers in tests).
A member is alive while it keeps producing newer adverts or answering us directly;
one that falls silent is evicted and remembered as a tombstone, so that copies of its
old adverts still circulating cannot bring it back. Only a newer advert can: a restart
brings a new incarnation.
"""

from dataclasses import dataclass
from enum import Enum

from ._adverts import Advert


class Change(Enum):
    NEW = "new"  # first advert from this member (or back after eviction)
    RESTARTED = "restarted"  # a new incarnation: addresses may have moved
    UPDATED = "updated"
    STALE = "stale"  # not newer than what we have: ignored


@dataclass
class Member:
    advert: Advert
    last_seen: float
    rtt_ms: float | None = None


class Membership:
    def __init__(self, own: Advert, now: float) -> None:
        self.own_id = own.peer_id
        self._members: dict[str, Member] = {own.peer_id: Member(own, now)}
        self._tombstones: dict[str, tuple[int, int]] = {}

    def apply(self, advert: Advert, now: float, direct: bool = False) -> Change:
        """Take in an advert if it is newer than what we know.

        ``direct`` means the member itself just sent it over an authenticated exchange:
        proof that it is alive now, so it lifts a tombstone even without a newer seq (a
        frozen peer that thaws keeps its old seq until something changes).
        """
        if advert.peer_id == self.own_id:
            return Change.STALE
        current = self._members.get(advert.peer_id)
        if current is not None:
            if advert.version <= current.advert.version:
                return Change.STALE
            change = (
                Change.RESTARTED
                if advert.incarnation != current.advert.incarnation
                else Change.UPDATED
            )
            current.advert = advert
            current.last_seen = now
            if change is Change.RESTARTED:
                current.rtt_ms = None
            return change
        tombstone = self._tombstones.get(advert.peer_id)
        if tombstone is not None and advert.version <= tombstone and not direct:
            return Change.STALE
        self._tombstones.pop(advert.peer_id, None)
        self._members[advert.peer_id] = Member(advert, now)
        return Change.NEW

    def set_own(self, advert: Advert, now: float) -> None:
        self._members[self.own_id] = Member(advert, now)

    @property
    def own(self) -> Advert:
        return self._members[self.own_id].advert

    def heard_from(self, peer_id: str, now: float, rtt_ms: float | None = None) -> None:
        """A direct exchange with a member succeeded."""
        member = self._members.get(peer_id)
        if member is not None:
            member.last_seen = now
            if rtt_ms is not None:
                member.rtt_ms = rtt_ms

    def evict_silent(self, now: float, silent_for: float) -> list[str]:
        """Drop members not heard from for ``silent_for`` seconds; return their ids."""
        gone = [
            peer_id
            for peer_id, member in self._members.items()
            if peer_id != self.own_id and now - member.last_seen > silent_for
        ]
        for peer_id in gone:
            self._tombstones[peer_id] = self._members.pop(peer_id).advert.version
        return gone

    def digest(self) -> dict[str, tuple[int, int]]:
        return {peer_id: m.advert.version for peer_id, m in self._members.items()}

    def newer_than(self, digest: dict[str, tuple[int, int]]) -> list[Advert]:
        """Adverts a peer with this digest has not seen yet."""
        return [
            m.advert
            for peer_id, m in self._members.items()
            if peer_id not in digest or m.advert.version > tuple(digest[peer_id])
        ]

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._members

    def get(self, peer_id: str) -> Member | None:
        return self._members.get(peer_id)

    def members(self) -> list[Member]:
        return list(self._members.values())
