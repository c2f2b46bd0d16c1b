"""Which deployments have been removed for good: undeploy markers, merged by every node.

An undeploy is a marker ``(model, upto)``: every deployment of ``model`` whose Lamport
time ``created`` is at most ``upto`` is gone. ``upto`` is a tick of the deployment
clock (see ``_clock``), so a deployment made after the undeployer had seen it, or by any
node that has since seen the marker, is newer and unaffected.

Markers ride in every node's advert and each node keeps the highest ``upto`` per model
it has seen (a merge that is commutative, associative and idempotent, so the order
adverts arrive in does not matter), and re-advertises them. They are also written to
the data dir, so a node that restarts still honours them. A host that was frozen or
cut off during the undeploy comes back advertising its old stages: every other node
already ignores entries its markers cover, and the host itself learns the marker from
the first adverts it receives and unloads them.

The table is bounded; past MAX_MARKERS the marker with the lowest ``upto`` goes first.
"""

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._clock import DeploymentClock

log = logging.getLogger(__name__)

MAX_MARKERS = 256


class Undeployed:
    def __init__(self, markers: dict[str, int] | None = None) -> None:
        self._upto: dict[str, int] = dict(markers or {})
        self.changes = 0  # bumped on every change: the owner saves and re-advertises

    def covers(self, model: str, created: int) -> bool:
        """Whether the deployment of ``model`` made at ``created`` has been undeployed."""
        return created <= self._upto.get(model, -1)

    def add(self, model: str, upto: int) -> bool:
        """Merge one marker; True if it changed anything."""
        if upto <= self._upto.get(model, -1):
            return False
        self._upto[model] = upto
        while len(self._upto) > MAX_MARKERS:
            del self._upto[min(self._upto, key=lambda m: (self._upto[m], m))]
        self.changes += 1
        return model in self._upto

    def learn(self, markers: Iterable[dict[str, Any]], clock: DeploymentClock) -> None:
        """Merge schema-checked markers from an advert; the clock moves past each one it
        admits, so this node's next deployment is newer. One too far ahead is ignored."""
        for marker in markers:
            if clock.observe(marker["upto"]):
                self.add(marker["model"], marker["upto"])

    def markers(self) -> list[dict[str, Any]]:
        return [{"model": m, "upto": u} for m, u in sorted(self._upto.items())]

    @classmethod
    def load(cls, path: Path) -> "Undeployed":
        """The markers saved in ``path``; a missing or unreadable file means none."""
        try:
            raw = json.loads(path.read_text())
            markers = {
                str(m): u
                for m, u in raw.items()
                if type(u) is int  # not bool, not float
            }
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable undeploy markers in %s: %s", path, exc)
            return cls()
        return cls(markers)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(sorted(self._upto.items())), indent=1))
        tmp.replace(path)
