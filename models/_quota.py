"""How far the store may grow, and what to remove to make room: decided without I/O.

A node's store fills with fragments it fetched to host stages, fragments it cut to
deploy, and training graphs. Without a bound a member could fill the disk by deploying
again and again. ``--max-store-gb`` bounds it; before anything is written, room is made
by evicting objects nobody needs (no name, no deployment, no stage, no transfer), oldest
first, and if even that is not enough the write is refused, saying how much was wanted
and how much is free.
"""

import shutil
from collections.abc import Mapping, Set
from pathlib import Path

from ._errors import StoreFullError

GB = 10**9
DEFAULT_SHARE = 0.5  # of the free disk at start


def default_quota(root: Path, used: int) -> int:
    """What the store holds now plus half of the disk's free space at start."""
    root.mkdir(parents=True, exist_ok=True)
    return used + int(shutil.disk_usage(root).free * DEFAULT_SHARE)


def show_bytes(count: int) -> str:
    for unit, scale in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def plan_eviction(
    objects: Mapping[str, tuple[int, float]],
    protected: Set[str],
    quota: int,
    used: int,
    wanted: int,
    what: str = "an object",
) -> list[str]:
    """The objects to remove so that ``wanted`` more bytes fit under ``quota``.

    ``objects`` maps each stored object to (size, time added); ``used`` is everything the
    store holds or has promised (objects plus writes in progress). Unprotected objects
    go oldest first, and only as many as needed. If evicting every one of them would
    still not make room, nothing is evicted and StoreFullError says why.
    """
    free = quota - used
    if wanted <= free:
        return []
    candidates = sorted(
        (added, sha, size) for sha, (size, added) in objects.items() if sha not in protected
    )
    chosen: list[str] = []
    for _, sha, size in candidates:
        chosen.append(sha)
        free += size
        if wanted <= free:
            return chosen
    reclaimable = sum(size for _, _, size in candidates)
    raise StoreFullError(
        f"store quota of {show_bytes(quota)} (--max-store-gb) is full: {what} needs "
        f"{show_bytes(wanted)}, {show_bytes(max(quota - used, 0))} is free, and objects no "
        f"model or deployment uses hold only {show_bytes(reclaimable)}",
        quota=quota,
        wanted=wanted,
        free=max(quota - used, 0),
    )
