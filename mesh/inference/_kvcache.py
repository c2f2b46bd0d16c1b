"""The key/value caches a decoder stage keeps for each generation session.

A stage of a language model remembers, per session, the keys and values its layers
computed for every token so far; only the new tokens' hidden states travel. The caches
share one byte budget per node. Room is made by evicting sessions least recently used
first, but only sessions idle for ``IDLE_S``: a session between two decode steps is
still being served, and evicting it would make its requester prefill everything again.
When no idle session can make room, the step is refused before it runs (``CacheFull``)
and the requester tries another replica. A step must name how many tokens the cache
already holds; a stage that holds another count (it restarted, it evicted the session,
or it is a replacement) says so (``CacheMiss``) instead of computing garbage.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from .._errors import MeshError

IDLE_S = 30.0  # a session untouched this long may be evicted for another
TTL_S = 600.0  # a session untouched this long is dropped even without pressure


class CacheMiss(MeshError):
    """The stage holds no cache of the length the step assumes."""


class CacheFull(MeshError):
    """The node's cache budget is spent on sessions that are still in use."""


Key = tuple[str, int, str]  # (deployment, stage, session)


@dataclass
class _Session:
    pasts: dict[str, np.ndarray]
    length: int
    bytes: int
    used: float
    busy: bool = False


@dataclass
class KVCache:
    budget: int
    clock: Callable[[], float] = trio.current_time
    _sessions: dict[Key, _Session] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(s.bytes for s in self._sessions.values())

    def sessions(self) -> int:
        return len(self._sessions)

    def begin(self, key: Key, past: int, after_bytes: int) -> "Step":
        """Start a step over ``past`` cached tokens, reserving ``after_bytes``, the cache's
        size once the step has run. A prefill (``past == 0``) starts the session afresh."""
        now = self.clock()
        self._drop_expired(now)
        held = self._sessions.get(key)
        if past == 0:
            self._sessions.pop(key, None)  # a prefill restarts the session
            held = None
        elif held is None or held.length != past:
            have = "nothing" if held is None else f"{held.length} tokens"
            raise CacheMiss(f"session {key[2][:8]} expects {past} cached tokens; here: {have}")
        if held is not None and held.busy:
            raise CacheMiss(f"session {key[2][:8]} already has a step running here")
        self._make_room(key, after_bytes - (held.bytes if held else 0), now)
        if held is None:
            held = self._sessions[key] = _Session({}, 0, 0, now)
        held.busy, held.used, held.bytes = True, now, max(held.bytes, after_bytes)
        return Step(self, key, held)

    def _commit(self, step: "Step", presents: dict[str, np.ndarray], length: int) -> None:
        held = step.session
        if self._sessions.get(step.key) is not held:
            return  # restarted by a prefill while this step ran: the newer one counts
        held.pasts, held.length, held.busy = presents, length, False
        held.bytes = sum(a.nbytes for a in presents.values())
        held.used = self.clock()

    def _abort(self, step: "Step") -> None:
        if self._sessions.get(step.key) is step.session:
            del self._sessions[step.key]

    def drop(self, key: Key) -> None:
        """Forget a session that has ended (a step still running commits into nothing)."""
        self._sessions.pop(key, None)

    def _make_room(self, key: Key, wanted: int, now: float) -> None:
        free = self.budget - self.used
        if wanted <= free:
            return
        idle = sorted(
            (s.used, k)
            for k, s in self._sessions.items()
            if k != key and not s.busy and now - s.used >= IDLE_S
        )
        for _, victim in idle:
            free += self._sessions.pop(victim).bytes
            if wanted <= free:
                return
        raise CacheFull(
            f"the key/value cache needs {wanted >> 10} KiB more; {free >> 10} KiB of its "
            f"{self.budget >> 10} KiB budget is free and {len(self._sessions)} sessions are in use"
        )

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if not s.busy and now - s.used > TTL_S]:
            del self._sessions[key]


@dataclass
class Step:
    """A step under way: commit its new cache, or abort (the session is then forgotten:
    its cache no longer matches anything the requester will ask for)."""

    cache: KVCache
    key: Key
    session: _Session

    @property
    def pasts(self) -> dict[str, np.ndarray] | None:
        return self.session.pasts or None

    def commit(self, presents: dict[str, np.ndarray], length: int) -> None:
        self.cache._commit(self, presents, length)

    def abort(self) -> None:
        self.cache._abort(self)
