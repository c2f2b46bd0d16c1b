"""Removing a deployment from the whole mesh, with no coordinator and no new protocol.

``undeploy(model)`` ticks the deployment clock and records the marker ``(model, upto)``
(see ``_undeployed``). The marker goes out in this node's next advert; every node that
receives it stops routing to the deployment at once, re-advertises the marker, and, if
it hosts stages of it, unloads them and drops their serving entries. The call returns
when no live member still advertises a stage of it, naming any that did not confirm in
time (they drop it when they next hear from the mesh).
"""

import logging
from pathlib import Path
from typing import Any

import trio

from .._peerid import short_id
from ..membership import Mesh
from ._router import Router
from ._serving import StageServer
from ._undeployed import Undeployed

log = logging.getLogger(__name__)

GONE_TIMEOUT_S = 15.0
POLL_S = 0.2


class Undeployer:
    def __init__(self, mesh: Mesh, server: StageServer, router: Router, path: Path | None) -> None:
        self.mesh = mesh
        self.server = server
        self.router = router
        self._path = path
        if path is not None:
            server.undeployed = Undeployed.load(path)
        for marker in server.undeployed.markers():  # our own file: trusted, however far
            server.clock.value = max(server.clock.value, marker["upto"])
        self._saved = server.undeployed.changes

    def markers(self) -> list[dict[str, Any]]:
        """What this node advertises: every marker it knows of."""
        return self.server.undeployed.markers()

    def sync(self) -> list[str]:
        """Learn the markers in every advert, drop the stages they cover, keep them on
        disk and re-advertise if anything changed; returns the deployments dropped."""
        self.router.deployments()  # learns every advert's markers
        dropped = self.server.drop_undeployed()
        for deployment in dropped:
            log.info("%s was undeployed: its stages here are unloaded", deployment)
        if self.server.undeployed.changes != self._saved:
            if self._path is not None:
                self.server.undeployed.save(self._path)
            self._saved = self.server.undeployed.changes
            self.mesh.refresh()
        return dropped

    def _advertised(self, model: str, upto: int | None = None) -> dict[str, set[str]]:
        """Deployments of ``model`` that members advertise, with their hosts: those not
        undeployed (``upto`` None), or those the marker at ``upto`` covers."""
        found: dict[str, set[str]] = {}
        for member in self.mesh.membership.members():
            peer_id = member.advert.peer_id
            for entry in member.advert.serving:
                if entry["model"] != model:
                    continue
                if upto is None:
                    wanted = not self.server.undeployed.covers(model, entry["created"])
                else:
                    wanted = entry["created"] <= upto and self.mesh.is_live(peer_id)
                if wanted:
                    found.setdefault(entry["deployment"], set()).add(peer_id)
        return found

    async def undeploy(self, model: str) -> dict[str, Any]:
        """Mark every deployment of ``model`` made so far as gone, mesh-wide.

        The marker is recorded even when no member advertises the model right now: its
        only hosts may be asleep (evicted members' adverts are forgotten), and when they
        wake they must drop it rather than bring it back.
        """
        self.router.deployments()  # the clock has seen every deployment and marker first
        found = self._advertised(model)
        upto = self.server.clock.tick()
        self.server.undeployed.add(model, upto)
        self.sync()
        with trio.move_on_after(GONE_TIMEOUT_S):
            while self._advertised(model, upto):
                await trio.sleep(POLL_S)
        pending = {p for hosts in self._advertised(model, upto).values() for p in hosts}
        hosts = {p for peers in found.values() for p in peers}
        return {
            "model": model,
            "upto": upto,
            "deployments": sorted(found),
            "hosts": sorted(hosts),
            "short_ids": sorted(short_id(p) for p in hosts),
            "pending": sorted(pending),
        }
