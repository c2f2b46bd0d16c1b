"""Who is in the mesh: adverts, when each member was last heard from, and its RTT.

Pure state with explicit times (trio's clock in the service, any numbers in tests).
A member is alive while it keeps producing newer adverts or answering us directly;
one that falls silent is evicted and remembered as a tombstone, so that copies of its
old adverts still circulating cannot bring it back. Only a newer advert can: a restart
brings a new incarnation.

The table is bounded (MAX_MEMBERS, tombstones MAX_TOMBSTONES): any member can relay
adverts of as many made-up peers as it likes, each validly signed by a fresh key. When it
is full, a member we have only heard of through others makes room first (the one heard
of longest ago); a member we have exchanged with directly makes room only for another
that did (the most silent one goes), and our own entry never goes.
"""

from dataclasses import dataclass
from enum import Enum

from ._adverts import Advert

MAX_MEMBERS = 256
MAX_TOMBSTONES = 1024


class Change(Enum):
    NEW = "new"  # first advert from this member (or back after eviction)
    RESTARTED = "restarted"  # a new incarnation: addresses may have moved
    UPDATED = "updated"
    STALE = "stale"  # not newer than what we have: ignored
    FULL = "full"  # a newcomer with no room left for it: ignored


@dataclass
class Member:
    advert: Advert
    last_seen: float
    rtt_ms: float | None = None
    direct: bool = False  # we have exchanged with it ourselves, not only heard of it


class Membership:
    def __init__(self, own: Advert, now: float, max_members: int = MAX_MEMBERS) -> None:
        self.own_id = own.peer_id
        self._members: dict[str, Member] = {own.peer_id: Member(own, now, direct=True)}
        self._tombstones: dict[str, tuple[int, int]] = {}
        self._max_members = max_members

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
            current.direct = current.direct or direct
            if change is Change.RESTARTED:
                current.rtt_ms = None
            return change
        tombstone = self._tombstones.get(advert.peer_id)
        if tombstone is not None and advert.version <= tombstone and not direct:
            return Change.STALE
        if len(self._members) >= self._max_members and not self._make_room(direct):
            return Change.FULL
        self._tombstones.pop(advert.peer_id, None)
        self._members[advert.peer_id] = Member(advert, now, direct=direct)
        return Change.NEW

    def _make_room(self, for_direct: bool) -> bool:
        """Drop the member heard of only through others for longest, if there is one;
        for a newcomer that spoke to us directly, else the most silent direct member."""
        others = [m for m in self._members.values() if m.advert.peer_id != self.own_id]
        indirect = [m for m in others if not m.direct]
        candidates = indirect or (others if for_direct else [])
        if not candidates:
            return False
        oldest = min(candidates, key=lambda m: m.last_seen)
        del self._members[oldest.advert.peer_id]
        return True

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
            member.direct = True
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
            self._tombstones.pop(peer_id, None)  # re-inserted last: the newest
            self._tombstones[peer_id] = self._members.pop(peer_id).advert.version
        while len(self._tombstones) > MAX_TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]
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
