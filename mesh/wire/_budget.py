"""How many bytes of frames a node holds at once: in total, and per sending peer.

Every frame's size is known from its header before its payload is read. A reader
leases that many bytes before reading the payload and the lease ends when the frame's
work is done; a stage leases its output before forwarding it. When the budget is spent
the reader stops reading, the sender's stream window fills and its writes wait: that is
the backpressure, end to end, measured in bytes rather than in queued tasks. The
per-peer share keeps one member (or one flood of streams) from taking the whole budget.
"""

from collections import Counter

import trio


class FrameBudget:
    def __init__(self, total: int, per_peer: int) -> None:
        if per_peer > total:
            raise ValueError("a peer's share cannot exceed the whole budget")
        self.total = total
        self.per_peer = per_peer
        self._used = 0
        self._by_peer: Counter[str] = Counter()
        self._released = trio.Event()

    @property
    def used(self) -> int:
        return self._used

    def fits(self, size: int) -> bool:
        """Whether a frame of ``size`` can ever be admitted (else: refuse it outright)."""
        return size <= self.per_peer

    async def lease(self, peer_id: str, size: int) -> "Lease":
        """Wait until ``size`` bytes fit in the budget and in ``peer_id``'s share."""
        if not self.fits(size):
            raise ValueError(f"{size} bytes exceed a peer's share of {self.per_peer}")
        while self._used + size > self.total or self._by_peer[peer_id] + size > self.per_peer:
            await self._released.wait()
        self._used += size
        self._by_peer[peer_id] += size
        return Lease(self, peer_id, size)

    def _release(self, peer_id: str, size: int) -> None:
        self._used -= size
        self._by_peer[peer_id] -= size
        if not self._by_peer[peer_id]:
            del self._by_peer[peer_id]
        self._released.set()
        self._released = trio.Event()


class Lease:
    """Bytes held from a budget until ``release`` (idempotent)."""

    def __init__(self, budget: FrameBudget, peer_id: str, size: int) -> None:
        self._budget = budget
        self._peer_id = peer_id
        self._size = size
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._budget._release(self._peer_id, self._size)
