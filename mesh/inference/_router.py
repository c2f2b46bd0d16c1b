"""Routing a request through a deployment, and replaying it when a stage dies.

The requester keeps every request's inputs until its answer arrives. Each attempt picks
one live peer per stage (fewest requests in flight from us, then lowest RTT; ourselves
when we host the stage) and sends the inputs to the first. The answer comes back from
the last stage. If a peer on the route is evicted, a stage reports that it could not
reach the next one, or a stage is not hosted where the adverts said, the request is
replayed on a route that avoids that peer. The first answer wins; a late duplicate from
an earlier attempt is dropped, so the caller gets each answer exactly once.
"""

import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from .._errors import MeshError
from .._peerid import short_id
from ..membership import Mesh
from ..wire import LinkError
from ._serving import ServingEntry, StageServer

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 8
WATCH_S = 0.2
ROUTE_WAIT_S = 5.0  # two membership exchanges, plus slack
RELEASE_TIMEOUT_S = 2.0
RELEASE = {
    "past": 0,
    "step": 0,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "seed": 0,
    "release": True,
}
RETRYABLE = {"unreachable", "not_hosted", "internal", "cache_full", "unavailable"}


class NoRouteError(MeshError):
    """Some stage of the deployment has no live peer."""

    def __init__(self, message: str, entry: "ServingEntry | None" = None) -> None:
        super().__init__(message)
        self.entry = entry


class UnknownDeploymentError(MeshError, LookupError):
    """No deployment of that model is known in the mesh."""


class StageRefusal(MeshError):
    """A stage refused the request itself (bad input): replaying would not help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Deployment:
    entries: list[ServingEntry]  # one per stage
    hosts: list[list[str]]  # live peers per stage


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    header: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


class Router:
    def __init__(self, mesh: Mesh, server: StageServer) -> None:
        self.mesh = mesh
        self.server = server
        server.on_reply = self._on_reply
        # Set by the deployer: host a stage that lost every replica on another live peer.
        self.rehost: Callable[[ServingEntry, set[str]], Awaitable[str]] | None = None
        self._pending: dict[str, _Pending] = {}
        self._in_flight: Counter[str] = Counter()

    def deployments(self) -> dict[str, Deployment]:
        """The newest deployment of each model, with the live hosts of each stage.

        Newest by Lamport time (see ``_clock``), preferring deployments whose every stage
        has a live host: a redeploy still landing, or a member advertising a stage of a
        deployment that exists nowhere else, does not take a working one's place.
        Undeployed ones are left out; the markers every advert carries are learned here
        (see ``_undeployed``).
        """
        hosted: dict[str, dict[int, tuple[ServingEntry, list[str]]]] = {}
        for member in self.mesh.membership.members():
            peer_id = member.advert.peer_id
            self.server.undeployed.learn(member.advert.undeployed, self.server.clock)
            if not self.mesh.is_live(peer_id) or not member.advert.compatible:
                continue
            for raw in member.advert.serving:
                entry = ServingEntry(**raw)
                if not self.server.clock.observe(entry.created):
                    log.debug("ignoring %s from %s: too far ahead", entry.deployment, peer_id)
                    continue
                if self.server.undeployed.covers(entry.model, entry.created):
                    continue  # undeployed: a host that missed it has not yet dropped it
                stages = hosted.setdefault(entry.deployment, {})
                stages.setdefault(entry.stage, (entry, []))[1].append(peer_id)
        newest: dict[str, tuple[tuple[bool, int, str], Deployment]] = {}
        for deployment, stages in hosted.items():
            template = next(iter(stages.values()))[0]
            hosts = [stages[i][1] if i in stages else [] for i in range(template.stages)]
            rank = (all(hosts), template.created, deployment)
            if template.model not in newest or rank > newest[template.model][0]:
                entries = [template.for_stage(i) for i in range(template.stages)]
                newest[template.model] = (rank, Deployment(entries, hosts))
        return {model: found for model, (_, found) in newest.items()}

    def current(self) -> dict[str, tuple[int, str]]:
        """The rank of each model's newest deployment that is whole (every stage live)."""
        return {
            model: found.entries[0].rank
            for model, found in self.deployments().items()
            if all(found.hosts)
        }

    def _route(
        self, model: str, deployment: Deployment, avoid: set[str], prefer: list[str] | None
    ) -> list[str]:
        """One live peer per stage; ``prefer`` (a session's route so far) wins where it
        is still usable, so a generation session keeps finding its caches."""
        route = []
        for stage, (entry, hosts) in enumerate(
            zip(deployment.entries, deployment.hosts, strict=True)
        ):
            usable = [p for p in hosts if p not in avoid and self.mesh.takes_work(p)]
            if not usable:
                raise NoRouteError(
                    f"no live peer holds stage {entry.stage + 1}/{entry.stages} of {model} "
                    f"(fragment {entry.fragment[:12]})",
                    entry,
                )
            if prefer is not None and stage < len(prefer) and prefer[stage] in usable:
                route.append(prefer[stage])
            else:
                route.append(min(usable, key=self._preference))
        return route

    async def _route_soon(
        self, model: str, deployment: Deployment, avoid: set[str], prefer: list[str] | None
    ) -> tuple[Deployment, list[str]]:
        """A route now, or within ROUTE_WAIT_S: a stage just deployed (or a replica that just
        rejoined) reaches this node's table with the next membership exchange."""
        replanned: set[int] = set()
        deadline = trio.current_time() + ROUTE_WAIT_S
        while True:
            try:
                return deployment, self._route(model, deployment, avoid, prefer)
            except NoRouteError as exc:
                # A stage whose hosts its owners hold back moves at once; after that, and
                # for any other stage, wait for an advert naming a host.
                moving = exc.entry is not None and exc.entry.stage not in replanned
                if trio.current_time() < deadline and not (
                    moving and self._held_back(exc.entry, deployment)
                ):
                    await trio.sleep(WATCH_S)
                    deployment = self.deployments().get(model, deployment)
                    continue
                entry = exc.entry
                if entry is None or self.rehost is None or entry.stage in replanned:
                    raise
                replanned.add(entry.stage)
                try:
                    peer_id = await self.rehost(entry, avoid)
                except MeshError as why:
                    raise NoRouteError(f"{exc}; re-planning it failed: {why}", entry) from why
                log.info("stage %d of %s re-planned onto %s", entry.stage, model, short_id(peer_id))
                deadline = trio.current_time() + ROUTE_WAIT_S  # its advert is on the way

    def _held_back(self, entry: "ServingEntry | None", deployment: Deployment) -> bool:
        """Whether a host of a stage no host can take is live but kept from work by its
        owner's policy: waiting for it would not help, so the stage moves at once."""
        if entry is None:
            return False
        return any(
            self.mesh.is_live(p) and self.mesh.unavailable_reason(p) is not None
            for p in deployment.hosts[entry.stage]
        )

    def _preference(self, peer_id: str) -> tuple[int, float]:
        if peer_id == self.mesh.peer_id:
            return (self._in_flight[peer_id], -1.0)
        member = self.mesh.membership.get(peer_id)
        rtt = member.rtt_ms if member is not None and member.rtt_ms is not None else 1e3
        return (self._in_flight[peer_id], rtt)

    def _on_reply(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        pending = self._pending.get(header["rid"])
        if pending is None or pending.done.is_set():
            return  # an answer to a request already answered (or never ours): drop it
        if header["kind"] == "error" and header.get("attempt") != pending.header.get("attempt"):
            return  # the failure of an attempt we have already given up on
        pending.header, pending.tensors = header, tensors
        pending.done.set()

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        gen: dict[str, Any] | None = None,
        avoid: set[str] | None = None,
        prefer: list[str] | None = None,
    ) -> tuple[dict[str, np.ndarray], list[Any]]:
        """Run ``model`` through its deployment; returns the outputs and the route taken.

        A generation step passes ``gen`` (see ``_headers.GEN``), the peers its session
        must avoid and its route so far. ``avoid`` grows with each peer that failed and is
        gone from the mesh; one that refused (say, no room for the session's cache) or
        timed out is avoided for this step only.
        """
        rid = uuid.uuid4().hex
        lasting = set() if avoid is None else avoid
        avoid = set(lasting)
        pending = _Pending()
        self._pending[rid] = pending
        try:
            for attempt in range(MAX_ATTEMPTS):
                deployment = self.deployments().get(model)
                if deployment is None:
                    raise UnknownDeploymentError(f"no deployment of {model!r} in the mesh")
                deployment, route = await self._route_soon(model, deployment, avoid, prefer)
                pending.header = {"attempt": attempt}
                header = {
                    "kind": "infer",
                    "rid": rid,
                    "attempt": attempt,
                    "dep": deployment.entries[0].deployment,
                    "stage": 0,
                    "route": route,
                    "reply": self.mesh.peer_id,
                    "downstream": [e.inputs for e in deployment.entries],
                    "trace": [],
                }
                if gen is not None:
                    header["gen"] = gen
                self._in_flight.update(route)
                try:
                    failed = await self._attempt(pending, header, inputs, route)
                finally:
                    self._in_flight.subtract(route)
                if failed is None:
                    return pending.tensors, pending.header.get("trace", [])
                log.info("request %s: replaying without %s", rid[:8], short_id(failed))
                avoid.add(failed)
                if not self.mesh.is_live(failed):
                    lasting.add(failed)
            raise NoRouteError(f"{model}: gave up after {MAX_ATTEMPTS} attempts")
        finally:
            del self._pending[rid]

    async def release(self, model: str, route: list[str], session: str) -> None:
        """Tell a session's stages, along its route, to drop its cache. Best effort, and
        quick: a stage that does not hear it evicts the cache once it is idle."""
        deployment = self.deployments().get(model)
        if deployment is None or len(route) != len(deployment.entries):
            return
        header = {
            "kind": "infer",
            "rid": uuid.uuid4().hex,
            "attempt": 0,
            "dep": deployment.entries[0].deployment,
            "stage": 0,
            "route": route,
            "reply": self.mesh.peer_id,
            "downstream": [[] for _ in route],
            "trace": [],
            "gen": {**RELEASE, "sid": session},
        }
        with trio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                await self.server.deliver(route[0], header, {})
            except MeshError as exc:
                log.debug("could not release session %s: %s", session[:8], exc)

    async def _attempt(
        self,
        pending: _Pending,
        header: dict[str, Any],
        inputs: dict[str, np.ndarray],
        route: list[str],
    ) -> str | None:
        """None when answered; else the peer to avoid next time."""
        try:
            await self.server.deliver(route[0], header, inputs)
        except LinkError:
            return route[0]
        with trio.move_on_after(ATTEMPT_TIMEOUT_S):
            while not pending.done.is_set():
                with trio.move_on_after(WATCH_S):
                    await pending.done.wait()
                gone = [p for p in route if not self.mesh.is_live(p)]
                if gone and not pending.done.is_set():
                    return gone[0]
            reply = pending.header
            if reply["kind"] == "result":
                return None
            pending.done = trio.Event()
            if reply["code"] in RETRYABLE:
                return str(reply.get("unreachable") or reply.get("peer"))
            raise StageRefusal(reply["code"], reply.get("message", "refused"))
        return next((p for p in route if p != self.mesh.peer_id), route[0])  # timed out
